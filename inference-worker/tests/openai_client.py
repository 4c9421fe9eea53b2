"""Drives a live tidal-worker with the official `openai` Python client.

Usage: python openai_client.py BASE_URL MODEL
Exits non-zero (with a message) on the first failed check.
"""

import sys

import openai


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)

    models = client.models.list()
    assert [m.id for m in models.data] == [model], models

    c = client.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0)
    assert c.object == "text_completion", c
    assert len(c.choices) == 1 and isinstance(c.choices[0].text, str), c
    assert c.choices[0].finish_reason in ("stop", "length"), c
    assert c.usage.prompt_tokens == 5, c.usage
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens, c.usage

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.object == "chat.completion", chat
    assert chat.choices[0].message.role == "assistant", chat
    assert isinstance(chat.choices[0].message.content, str), chat
    assert chat.usage.completion_tokens >= 1, chat.usage

    # Streaming must reassemble into the non-streaming answer (greedy).
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert "".join(parts) == chat.choices[0].message.content, (parts, chat)
    assert finish == chat.choices[0].finish_reason, finish
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

    text = "".join(
        ch.choices[0].text
        for ch in client.completions.create(
            model=model, prompt="Hello", max_tokens=8, temperature=0, stream=True
        )
        if ch.choices
    )
    assert text == c.choices[0].text, (text, c)

    # Log probabilities as lm-evaluation-harness reads them: the prompt echoed with its
    # tokens' log probabilities (the first has none), then the generated ones.
    scored = client.completions.create(
        model=model, prompt="Hello", max_tokens=2, temperature=0, logprobs=2, echo=True
    )
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text.startswith("Hello"), scored
    assert lp.token_logprobs[0] is None, lp
    assert len(lp.tokens) == scored.usage.prompt_tokens + scored.usage.completion_tokens, lp
    assert all(x <= 0 for x in lp.token_logprobs[1:]), lp
    assert all(len(t) >= 1 for t in lp.top_logprobs[1:]), lp
    # A prompt of token ids.
    by_ids = client.completions.create(model=model, prompt=[5, 6, 7], max_tokens=2, temperature=0)
    assert by_ids.usage.prompt_tokens == 3, by_ids.usage
    # Chat: logprobs with alternatives.
    chat_lp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat_lp.choices[0].logprobs.content
    assert len(content) == chat_lp.usage.completion_tokens, content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content), content

    # n choices, also streamed (chunks carry their choice's index).
    two = client.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1], two
    assert two.choices[0].text == two.choices[1].text, two
    by_index = {}
    for ch in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        n=2,
        stream=True,
    ):
        for choice in ch.choices:
            by_index.setdefault(choice.index, []).append(choice.delta.content or "")
    assert sorted(by_index) == [0, 1], by_index
    assert "".join(by_index[0]) == "".join(by_index[1]), by_index

    # Errors surface as the client's typed exceptions.
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404
    try:
        client.completions.create(model=model, prompt="x", temperature=5)
        raise AssertionError("temperature 5 accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "temperature", e.body

    print("openai client checks passed")


if __name__ == "__main__":
    main()
