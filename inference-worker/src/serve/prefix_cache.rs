//! Prefix reuse: the attention cache of prompt blocks already computed, kept under a
//! memory budget, so that requests sharing a prompt prefix (a system prompt, the earlier
//! turns of a chat, a document asked about twice) skip recomputing it.
//!
//! A prompt is cut into blocks of `block_tokens`; a block is found by a hash of its
//! tokens chained to the hash of the block before it, so a hit on block i means the whole
//! prefix up to it matched. Entries keep their tokens and parent hash and are compared on
//! lookup: a hash collision is a miss, never someone else's cache. Eviction is least
//! recently used, and every use touches a chain from its deepest block up to its first, so
//! a parent is always newer than its children: the cache sheds prefixes from their tails
//! and never keeps a block whose parent is gone (it could not be reached).

use crate::error::Result;
use crate::model::decoder::KvCache;
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

/// The hash a prompt's first block chains from.
const ROOT: u64 = 0x7469_6461_6c2d_6b76;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixCacheConfig {
    /// Tokens per block: only whole blocks are cached and reused.
    pub block_tokens: usize,
    /// Most bytes of key/value tensors kept; least recently used blocks go first.
    pub budget_bytes: usize,
}

struct Block {
    parent: u64,
    tokens: Box<[u32]>,
    /// (key, value) per layer, each `(1, kv_heads, block_tokens, head_dim)` (under latent
    /// attention the value's last dimension is narrower than the key's), owning its
    /// storage (not a view into a sequence's cache, which would keep all of it alive).
    kv: Vec<(Tensor, Tensor)>,
    bytes: usize,
    tick: u64,
}

/// What one [`PrefixCache::insert`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    pub new_blocks: usize,
    pub evicted: usize,
}

pub struct PrefixCache {
    cfg: PrefixCacheConfig,
    blocks: HashMap<u64, Block>,
    /// tick -> block hash, oldest first.
    lru: BTreeMap<u64, u64>,
    tick: u64,
    bytes: usize,
}

impl PrefixCache {
    pub fn new(cfg: PrefixCacheConfig) -> Self {
        Self {
            cfg: PrefixCacheConfig {
                block_tokens: cfg.block_tokens.max(1),
                ..cfg
            },
            blocks: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            bytes: 0,
        }
    }

    pub fn config(&self) -> PrefixCacheConfig {
        self.cfg
    }

    /// Bytes of key/value tensors held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The chained hashes of `tokens`' first `n` whole blocks.
    fn chain(&self, tokens: &[u32], n: usize) -> Vec<u64> {
        let mut parent = ROOT;
        tokens
            .chunks_exact(self.cfg.block_tokens)
            .take(n)
            .map(|block| {
                let mut h = DefaultHasher::new();
                parent.hash(&mut h);
                block.hash(&mut h);
                parent = h.finish();
                parent
            })
            .collect()
    }

    /// The block `hash` if it really holds `tokens` after `parent`.
    fn matching(&self, hash: u64, parent: u64, tokens: &[u32]) -> bool {
        self.blocks
            .get(&hash)
            .is_some_and(|b| b.parent == parent && &*b.tokens == tokens)
    }

    /// Marks `chain` used, deepest block first, so that each parent ends newer than its
    /// children.
    fn touch(&mut self, chain: &[u64]) {
        for hash in chain.iter().rev() {
            if let Some(b) = self.blocks.get_mut(hash) {
                self.lru.remove(&b.tick);
                self.tick += 1;
                b.tick = self.tick;
                self.lru.insert(self.tick, *hash);
            }
        }
    }

    /// The longest cached prefix of `prompt` that still leaves at least two tokens to
    /// compute (the last one's logits give the first generated token; two or more rows keep
    /// the prefill on the attention kernels a whole prefill takes, so the answer is the one
    /// computed from scratch), written into `fresh` (an empty cache of the model); returns
    /// the cache and how many prompt tokens it holds.
    pub fn lookup(&mut self, prompt: &[u32], fresh: KvCache) -> Result<(KvCache, usize)> {
        self.lookup_where(prompt, fresh, |_| true)
    }

    /// [`Self::lookup`], reusing only a prefix length `accept` takes (the longest such).
    pub fn lookup_where(
        &mut self,
        prompt: &[u32],
        mut fresh: KvCache,
        accept: impl Fn(usize) -> bool,
    ) -> Result<(KvCache, usize)> {
        debug_assert!(fresh.is_empty());
        let most = prompt.len().saturating_sub(2) / self.cfg.block_tokens;
        let chain = self.chain(prompt, most);
        let mut hit = 0;
        let mut parent = ROOT;
        for (i, &hash) in chain.iter().enumerate() {
            let b = self.cfg.block_tokens;
            if !self.matching(hash, parent, &prompt[i * b..(i + 1) * b]) {
                break;
            }
            hit += 1;
            parent = hash;
        }
        while hit > 0 && !accept(hit * self.cfg.block_tokens) {
            hit -= 1;
        }
        if hit == 0 {
            return Ok((fresh, 0));
        }
        let chain = &chain[..hit];
        for (l, slot) in fresh.layers.iter_mut().enumerate() {
            let ks: Vec<&Tensor> = chain.iter().map(|h| &self.blocks[h].kv[l].0).collect();
            let vs: Vec<&Tensor> = chain.iter().map(|h| &self.blocks[h].kv[l].1).collect();
            // Tensors are immutable: one block can be shared as it is; the attention
            // layer concatenates into a new tensor when the sequence grows.
            *slot = Some((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?));
        }
        let reused = hit * self.cfg.block_tokens;
        fresh.len = reused;
        self.touch(chain);
        Ok((fresh, reused))
    }

    /// Keeps the whole blocks of `prompt` whose keys and values `cache` holds (the
    /// cache of that prompt, possibly with generated tokens after it), then evicts down
    /// to the budget.
    pub fn insert(&mut self, prompt: &[u32], cache: &KvCache) -> Result<Inserted> {
        let b = self.cfg.block_tokens;
        let n = prompt.len().min(cache.len()) / b;
        let chain = self.chain(prompt, n);
        let mut done = Inserted::default();
        let mut parent = ROOT;
        for (i, &hash) in chain.iter().enumerate() {
            let tokens = &prompt[i * b..(i + 1) * b];
            if !self.matching(hash, parent, tokens) {
                // A different block under the same hash (a collision) is replaced.
                self.remove(hash);
                let mut kv = Vec::with_capacity(cache.layers.len());
                let mut bytes = 0;
                for slot in &cache.layers {
                    let Some((k, v)) = slot else {
                        return Ok(done);
                    };
                    let k = k.narrow(2, i * b, b)?.force_contiguous()?;
                    let v = v.narrow(2, i * b, b)?.force_contiguous()?;
                    bytes += (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes();
                    kv.push((k, v));
                }
                self.bytes += bytes;
                self.blocks.insert(
                    hash,
                    Block {
                        parent,
                        tokens: tokens.into(),
                        kv,
                        bytes,
                        tick: 0,
                    },
                );
                self.tick += 1;
                self.lru.insert(self.tick, hash);
                self.blocks.get_mut(&hash).expect("just inserted").tick = self.tick;
                done.new_blocks += 1;
            }
            parent = hash;
        }
        self.touch(&chain);
        while self.bytes > self.cfg.budget_bytes {
            let Some((_, hash)) = self.lru.pop_first() else {
                break;
            };
            self.remove(hash);
            done.evicted += 1;
        }
        Ok(done)
    }

    fn remove(&mut self, hash: u64) {
        if let Some(b) = self.blocks.remove(&hash) {
            self.lru.remove(&b.tick);
            self.bytes -= b.bytes;
        }
    }

    /// Drops every block.
    pub fn clear(&mut self) {
        self.blocks.clear();
        self.lru.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    const LAYERS: usize = 2;

    /// A cache of `tokens.len()` positions whose key at position p (every head and
    /// dimension) is `tokens[p] * 10 + layer`, and whose value is its negation: what a
    /// model computes from the tokens and nothing else.
    fn cache_of(tokens: &[u32]) -> KvCache {
        let layers = (0..LAYERS)
            .map(|l| {
                let k: Vec<f32> = (0..2)
                    .flat_map(|_| {
                        tokens
                            .iter()
                            .flat_map(move |&t| [(t * 10 + l as u32) as f32; 3])
                    })
                    .collect();
                let k = Tensor::from_vec(k, (1, 2, tokens.len(), 3), &Device::Cpu).unwrap();
                let v = k.neg().unwrap();
                Some((k, v))
            })
            .collect();
        KvCache::holding(layers, tokens.len())
    }

    fn empty() -> KvCache {
        KvCache::holding(vec![None; LAYERS], 0)
    }

    fn keys(cache: &KvCache, layer: usize) -> Vec<f32> {
        let (k, _) = cache.layers[layer].as_ref().unwrap();
        k.i((0, 0))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn cache(block: usize, budget: usize) -> PrefixCache {
        PrefixCache::new(PrefixCacheConfig {
            block_tokens: block,
            budget_bytes: budget,
        })
    }

    /// Bytes of one block: keys and values, `LAYERS` layers, 2 heads of 3 dims, f32.
    fn block_bytes(block: usize) -> usize {
        2 * LAYERS * 2 * block * 3 * 4
    }

    #[test]
    fn a_shared_prefix_is_reused_whole_blocks_only_and_one_token_is_left_to_compute() {
        let mut pc = cache(4, 1 << 20);
        let first: Vec<u32> = (1..=10).collect();
        assert_eq!(pc.lookup(&first, empty()).unwrap().1, 0);
        let done = pc.insert(&first, &cache_of(&first)).unwrap();
        assert_eq!(done.new_blocks, 2, "10 tokens hold two whole blocks of 4");
        assert_eq!(pc.bytes(), 2 * block_bytes(4));

        // Same first 9 tokens, then different: both blocks are reused.
        let second: Vec<u32> = (1..=9).chain([99, 98, 97]).collect();
        let (kv, reused) = pc.lookup(&second, empty()).unwrap();
        assert_eq!(reused, 8);
        assert_eq!(kv.len(), 8);
        for l in 0..LAYERS {
            let want: Vec<f32> = (1..=8u32)
                .flat_map(|t| [(t * 10 + l as u32) as f32; 3])
                .collect();
            assert_eq!(keys(&kv, l), want, "layer {l}");
            let (_, v) = kv.layers[l].as_ref().unwrap();
            let v: Vec<f32> = v
                .i((0, 1))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(
                v,
                want.iter().map(|x| -x).collect::<Vec<_>>(),
                "values, layer {l}"
            );
        }

        // A prompt of exactly 8 tokens reuses one block: at least two are computed.
        assert_eq!(pc.lookup(&first[..8], empty()).unwrap().1, 4);
        assert_eq!(pc.lookup(&first[..10], empty()).unwrap().1, 8);
        assert_eq!(pc.lookup(&first[..9], empty()).unwrap().1, 4);
        // A difference inside the first block: nothing matches, not even the second
        // block's tokens (they follow a different prefix).
        let third: Vec<u32> = [1, 2, 0, 4].into_iter().chain(5..=10).collect();
        assert_eq!(pc.lookup(&third, empty()).unwrap().1, 0);
        assert_eq!(pc.insert(&third, &cache_of(&third)).unwrap().new_blocks, 2);
        assert_eq!(pc.len(), 4);
    }

    #[test]
    fn inserted_blocks_own_their_storage() {
        let mut pc = cache(2, 1 << 20);
        let tokens: Vec<u32> = (1..=6).collect();
        let full = cache_of(&tokens);
        pc.insert(&tokens, &full).unwrap();
        for b in pc.blocks.values() {
            for (k, v) in &b.kv {
                assert_eq!(k.dims(), &[1, 2, 2, 3]);
                assert!(k.is_contiguous() && v.is_contiguous());
            }
        }
        assert_eq!(pc.bytes(), 3 * block_bytes(2));
    }

    #[test]
    fn eviction_sheds_prefixes_from_their_tails_and_keeps_the_budget() {
        // Room for three blocks of 2.
        let mut pc = cache(2, 3 * block_bytes(2));
        let a: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7];
        assert_eq!(pc.insert(&a, &cache_of(&a)).unwrap().new_blocks, 3);
        let b: Vec<u32> = vec![1, 2, 30, 40, 50];
        let done = pc.insert(&b, &cache_of(&b)).unwrap();
        assert_eq!(
            done,
            Inserted {
                new_blocks: 1,
                evicted: 1
            }
        );
        assert!(pc.bytes() <= 3 * block_bytes(2));
        // a's tail went, its head and b's blocks stay.
        assert_eq!(pc.lookup(&a, empty()).unwrap().1, 4);
        assert_eq!(
            pc.lookup(&[&b[..], &[60, 70]].concat(), empty()).unwrap().1,
            4
        );
        // Every block left has its parent: no unreachable block holds memory.
        let c: Vec<u32> = vec![7, 8, 9, 10, 11, 12];
        pc.insert(&c, &cache_of(&c)).unwrap();
        assert_eq!(pc.len(), 3);
        for b in pc.blocks.values() {
            assert!(b.parent == ROOT || pc.blocks.contains_key(&b.parent));
        }
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let mut pc = cache(2, 0);
        let a: Vec<u32> = (1..=8).collect();
        let done = pc.insert(&a, &cache_of(&a)).unwrap();
        assert_eq!(done.new_blocks, done.evicted);
        assert_eq!((pc.len(), pc.bytes()), (0, 0));
        assert!(pc.lru.is_empty());
    }
}
