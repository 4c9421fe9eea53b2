//! Request traces: read one of the formats in `shared/traces/` (detected from the content) and
//! turn it into arrival counts per simulation tick (a fluid representation: 14 days at
//! hundreds of requests per second would be hundreds of millions of individual requests).
//! Request-level traces also keep their requests (time and sizes) for the discrete-event mode.

use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::synthetic::poisson;

/// One request of a request-level trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Request {
    /// Seconds since the trace's first request.
    pub t_s: f64,
    pub input_tokens: u32,
    pub output_tokens: u32,
}

/// Arrivals per tick, plus the mean request size (used to derive prefill time).
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub name: String,
    pub tick_s: f64,
    /// Requests arriving during each tick (fractional after `scale`).
    pub arrivals: Vec<f64>,
    pub mean_input_tokens: f64,
    pub mean_output_tokens: f64,
    /// The trace's own requests in arrival order (unscaled); empty for aggregate-rate traces
    /// and synthetic patterns, whose requests the discrete-event mode draws from `arrivals`.
    pub requests: Vec<Request>,
}

impl Trace {
    pub fn duration_s(&self) -> f64 {
        self.arrivals.len() as f64 * self.tick_s
    }

    pub fn total_requests(&self) -> f64 {
        self.arrivals.iter().sum()
    }

    pub fn mean_rps(&self) -> f64 {
        let d = self.duration_s();
        if d > 0.0 {
            self.total_requests() / d
        } else {
            0.0
        }
    }

    /// Highest mean rate over any aligned window of `window_s` seconds.
    pub fn peak_rps(&self, window_s: f64) -> f64 {
        let per = ((window_s / self.tick_s).round() as usize).max(1);
        self.arrivals
            .chunks(per)
            .map(|c| c.iter().sum::<f64>() / (c.len() as f64 * self.tick_s))
            .fold(0.0, f64::max)
    }

    /// Keep only the first `duration_s` seconds.
    pub fn truncate(&mut self, duration_s: f64) {
        let n = (duration_s / self.tick_s).ceil() as usize;
        self.arrivals.truncate(n.max(1));
        let end = self.duration_s();
        self.requests.retain(|r| r.t_s < end);
    }
}

/// The file formats of `shared/traces/` (see its README).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceFormat {
    /// `TIMESTAMP,ContextTokens,GeneratedTokens`, one row per request.
    Azure2023,
    /// JSONL `{"timestamp": ms, "input_length", "output_length", ...}`, one line per request.
    Mooncake,
    /// `window_start_s,total_rate_rps,...`: aggregate rate per window; arrivals synthesised.
    ServeGenRate,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read trace {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error(
        "{name}: unknown trace format (expected an Azure 2023 CSV with a TIMESTAMP header, \
         Mooncake JSONL, or a ServeGen CSV with a window_start_s header); first line: {first:?}"
    )]
    UnknownFormat { name: String, first: String },
    #[error("{name}, line {line}: {msg}")]
    Bad {
        name: String,
        line: usize,
        msg: String,
    },
    #[error("{name}: the trace has no requests")]
    Empty { name: String },
    #[error("invalid option: {0}")]
    Option(String),
}

/// How to turn a trace into ticks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadOptions {
    pub tick_s: f64,
    /// Multiplies every rate (and every count of request-level traces).
    pub scale: f64,
    /// Seeds the arrivals synthesised from aggregate rates.
    pub seed: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            tick_s: 1.0,
            scale: 1.0,
            seed: 1,
        }
    }
}

/// The tick used when none is given: 1 s for the request-level traces (about an hour long),
/// 5 s for the 14-day aggregate-rate ones.
pub fn default_tick_s(format: TraceFormat) -> f64 {
    match format {
        TraceFormat::ServeGenRate => 5.0,
        TraceFormat::Azure2023 | TraceFormat::Mooncake => 1.0,
    }
}

/// Like [`load`], with the tick chosen by [`default_tick_s`] when `tick_s` is `None`.
pub fn load_auto(
    path: &Path,
    tick_s: Option<f64>,
    scale: f64,
    seed: u64,
) -> Result<Trace, TraceError> {
    let (name, text) = read(path)?;
    let tick_s = match tick_s {
        Some(t) => t,
        None => default_tick_s(detect(&name, &text)?),
    };
    parse(
        &name,
        &text,
        &LoadOptions {
            tick_s,
            scale,
            seed,
        },
    )
}

fn read(path: &Path) -> Result<(String, String), TraceError> {
    let text = std::fs::read_to_string(path).map_err(|err| TraceError::Io {
        path: path.display().to_string(),
        err,
    })?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    Ok((name, text))
}

/// Reads and parses the trace at `path`; the format is detected from the content.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Trace, TraceError> {
    let (name, text) = read(path)?;
    parse(&name, &text, opts)
}

/// Detects the format from the first non-empty line.
pub fn detect(name: &str, text: &str) -> Result<TraceFormat, TraceError> {
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let lower = first.trim_start_matches('\u{feff}').to_ascii_lowercase();
    if lower.starts_with('{') {
        Ok(TraceFormat::Mooncake)
    } else if lower.starts_with("timestamp,") {
        Ok(TraceFormat::Azure2023)
    } else if lower.starts_with("window_start_s,") {
        Ok(TraceFormat::ServeGenRate)
    } else {
        Err(TraceError::UnknownFormat {
            name: name.to_string(),
            first: first.chars().take(80).collect(),
        })
    }
}

/// Parses trace text (see [`load`]).
pub fn parse(name: &str, text: &str, opts: &LoadOptions) -> Result<Trace, TraceError> {
    if !(opts.tick_s > 0.0 && opts.tick_s.is_finite()) {
        return Err(TraceError::Option(format!(
            "tick must be > 0 s, got {}",
            opts.tick_s
        )));
    }
    if !(opts.scale > 0.0 && opts.scale.is_finite()) {
        return Err(TraceError::Option(format!(
            "scale must be > 0, got {}",
            opts.scale
        )));
    }
    match detect(name, text)? {
        TraceFormat::Azure2023 => {
            let reqs = parse_azure(name, text)?;
            Ok(from_requests(name, reqs, opts))
        }
        TraceFormat::Mooncake => {
            let reqs = parse_mooncake(name, text)?;
            Ok(from_requests(name, reqs, opts))
        }
        TraceFormat::ServeGenRate => parse_servegen(name, text, opts),
    }
}

/// One parsed row: arrival time (s, any origin), prompt and generated tokens.
type Row = (f64, f64, f64);

fn bad(name: &str, line: usize, msg: impl Into<String>) -> TraceError {
    TraceError::Bad {
        name: name.to_string(),
        line,
        msg: msg.into(),
    }
}

fn from_requests(name: &str, mut reqs: Vec<Row>, opts: &LoadOptions) -> Trace {
    reqs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let t0 = reqs[0].0;
    let last = reqs[reqs.len() - 1].0 - t0;
    let n = ((last / opts.tick_s).floor() as usize) + 1;
    let mut arrivals = vec![0.0; n];
    let (mut inp, mut out) = (0.0, 0.0);
    for &(t, i, o) in &reqs {
        let k = (((t - t0) / opts.tick_s).floor() as usize).min(n - 1);
        arrivals[k] += opts.scale;
        inp += i;
        out += o;
    }
    let count = reqs.len() as f64;
    let tokens = |x: f64| x.round().min(f64::from(u32::MAX)) as u32;
    Trace {
        name: name.to_string(),
        tick_s: opts.tick_s,
        arrivals,
        mean_input_tokens: inp / count,
        mean_output_tokens: out / count,
        requests: reqs
            .iter()
            .map(|&(t, i, o)| Request {
                t_s: t - t0,
                input_tokens: tokens(i),
                output_tokens: tokens(o),
            })
            .collect(),
    }
}

fn parse_num(name: &str, line: usize, field: &str, s: &str) -> Result<f64, TraceError> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| bad(name, line, format!("{field}: not a number: {s:?}")))?;
    if !v.is_finite() || v < 0.0 {
        return Err(bad(name, line, format!("{field}: must be >= 0, got {s:?}")));
    }
    Ok(v)
}

fn parse_azure(name: &str, text: &str) -> Result<Vec<Row>, TraceError> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers = rdr
        .headers()
        .map_err(|e| bad(name, 1, e.to_string()))?
        .clone();
    let col = |want: &str| {
        headers
            .iter()
            .position(|h| {
                h.trim()
                    .trim_start_matches('\u{feff}')
                    .eq_ignore_ascii_case(want)
            })
            .ok_or_else(|| bad(name, 1, format!("missing column {want}")))
    };
    let (ct, cc, cg) = (
        col("TIMESTAMP")?,
        col("ContextTokens")?,
        col("GeneratedTokens")?,
    );
    let mut out = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let line = i + 2;
        let rec = rec.map_err(|e| bad(name, line, e.to_string()))?;
        let get = |c: usize| rec.get(c).unwrap_or("");
        let t = parse_azure_timestamp(get(ct)).map_err(|m| bad(name, line, m))?;
        let ctx = parse_num(name, line, "ContextTokens", get(cc))?;
        let gen_ = parse_num(name, line, "GeneratedTokens", get(cg))?;
        out.push((t, ctx, gen_));
    }
    if out.is_empty() {
        return Err(TraceError::Empty {
            name: name.to_string(),
        });
    }
    Ok(out)
}

/// `YYYY-MM-DD HH:MM:SS[.fffffff]` -> seconds since 1970-01-01 (no time zone).
pub fn parse_azure_timestamp(s: &str) -> Result<f64, String> {
    let err = || format!("TIMESTAMP: expected YYYY-MM-DD HH:MM:SS.fffffff, got {s:?}");
    let s = s.trim();
    let (date, time) = s.split_once(' ').ok_or_else(err)?;
    let d: Vec<&str> = date.split('-').collect();
    let t: Vec<&str> = time.split(':').collect();
    if d.len() != 3 || t.len() != 3 {
        return Err(err());
    }
    let int = |x: &str| x.parse::<i64>().map_err(|_| err());
    let (y, mo, da) = (int(d[0])?, int(d[1])?, int(d[2])?);
    let (h, mi) = (int(t[0])?, int(t[1])?);
    let sec: f64 = t[2].parse().map_err(|_| err())?;
    if !(1..=12).contains(&mo)
        || !(1..=31).contains(&da)
        || !(0..24).contains(&h)
        || !(0..60).contains(&mi)
        || !(0.0..61.0).contains(&sec)
    {
        return Err(err());
    }
    let days = days_from_civil(y, mo, da);
    Ok(days as f64 * 86400.0 + (h * 3600 + mi * 60) as f64 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

#[derive(serde::Deserialize)]
struct MooncakeLine {
    timestamp: f64,
    input_length: f64,
    output_length: f64,
}

fn parse_mooncake(name: &str, text: &str) -> Result<Vec<Row>, TraceError> {
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() {
            continue;
        }
        let r: MooncakeLine =
            serde_json::from_str(l).map_err(|e| bad(name, i + 1, e.to_string()))?;
        if !(r.timestamp.is_finite() && r.timestamp >= 0.0) {
            return Err(bad(name, i + 1, "timestamp must be >= 0 ms"));
        }
        out.push((r.timestamp / 1000.0, r.input_length, r.output_length));
    }
    if out.is_empty() {
        return Err(TraceError::Empty {
            name: name.to_string(),
        });
    }
    Ok(out)
}

fn parse_servegen(name: &str, text: &str, opts: &LoadOptions) -> Result<Trace, TraceError> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers = rdr
        .headers()
        .map_err(|e| bad(name, 1, e.to_string()))?
        .clone();
    let col = |want: &str| {
        headers
            .iter()
            .position(|h| h.trim().trim_start_matches('\u{feff}') == want)
            .ok_or_else(|| bad(name, 1, format!("missing column {want}")))
    };
    let (cs, cr) = (col("window_start_s")?, col("total_rate_rps")?);
    let mut windows: Vec<(f64, f64)> = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let line = i + 2;
        let rec = rec.map_err(|e| bad(name, line, e.to_string()))?;
        let start = parse_num(name, line, "window_start_s", rec.get(cs).unwrap_or(""))?;
        let rate = parse_num(name, line, "total_rate_rps", rec.get(cr).unwrap_or(""))?;
        if let Some(&(prev, _)) = windows.last()
            && start <= prev
        {
            return Err(bad(name, line, "window_start_s must increase"));
        }
        windows.push((start, rate));
    }
    if windows.is_empty() || windows.iter().all(|w| w.1 == 0.0) {
        return Err(TraceError::Empty {
            name: name.to_string(),
        });
    }
    let width = if windows.len() > 1 {
        windows[1].0 - windows[0].0
    } else {
        600.0
    };
    let t0 = windows[0].0;
    let end = windows[windows.len() - 1].0 + width;
    // Rate between window midpoints is interpolated linearly (no artificial 10-minute steps).
    let mids: Vec<(f64, f64)> = windows
        .iter()
        .enumerate()
        .map(|(i, &(s, r))| {
            let w = windows.get(i + 1).map_or(width, |n| n.0 - s);
            (s + w / 2.0 - t0, r)
        })
        .collect();
    let n = ((end - t0) / opts.tick_s).ceil() as usize;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut arrivals = Vec::with_capacity(n);
    let mut j = 0;
    for k in 0..n {
        let t = (k as f64 + 0.5) * opts.tick_s;
        while j + 1 < mids.len() && mids[j + 1].0 <= t {
            j += 1;
        }
        let rate = if t <= mids[0].0 {
            mids[0].1
        } else if j + 1 >= mids.len() {
            mids[mids.len() - 1].1
        } else {
            let (a, b) = (mids[j], mids[j + 1]);
            a.1 + (b.1 - a.1) * (t - a.0) / (b.0 - a.0)
        };
        arrivals.push(poisson(&mut rng, rate * opts.scale * opts.tick_s));
    }
    Ok(Trace {
        name: name.to_string(),
        tick_s: opts.tick_s,
        arrivals,
        // The aggregate files carry no token counts; a typical chat request.
        mean_input_tokens: 1000.0,
        mean_output_tokens: 250.0,
        requests: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AZURE: &str = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
        2023-11-16 18:17:03.9799600,4808,10\n\
        2023-11-16 18:17:04.0319600,3180,8\n\
        2023-11-16 18:17:06.5000000,100,30\n";

    #[test]
    fn azure_rows_become_counts_per_tick() {
        let t = parse("az", AZURE, &LoadOptions::default()).unwrap();
        // t = 0, 0.052, 2.52 s from the first request.
        assert_eq!(t.arrivals, vec![2.0, 0.0, 1.0]);
        assert_eq!(t.requests.len(), 3);
        let r = t.requests[2];
        assert!((r.t_s - 2.52).abs() < 1e-3, "{r:?}");
        assert_eq!((r.input_tokens, r.output_tokens), (100, 30));
        assert!((t.mean_input_tokens - (4808.0 + 3180.0 + 100.0) / 3.0).abs() < 1e-9);
        assert!((t.mean_output_tokens - 16.0).abs() < 1e-9);
    }

    #[test]
    fn azure_timestamps_cross_midnight_and_months() {
        let a = parse_azure_timestamp("2023-02-28 23:59:59.5000000").unwrap();
        let b = parse_azure_timestamp("2023-03-01 00:00:00.2500000").unwrap();
        assert!((b - a - 0.75).abs() < 1e-6);
        assert_eq!(
            parse_azure_timestamp("1970-01-02 00:00:00").unwrap(),
            86400.0
        );
    }

    #[test]
    fn azure_bad_timestamp_names_the_line() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
            2023-11-16 18:17:03.9799600,4808,10\n\
            yesterday,1,1\n";
        let e = parse("az", text, &LoadOptions::default()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("line 3") && msg.contains("TIMESTAMP"), "{msg}");
    }

    #[test]
    fn azure_negative_tokens_rejected() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,-4,10\n";
        let e = parse("az", text, &LoadOptions::default()).unwrap_err();
        assert!(e.to_string().contains("ContextTokens"), "{e}");
    }

    #[test]
    fn mooncake_lines_and_scale() {
        let text = "{\"timestamp\": 0, \"input_length\": 100, \"output_length\": 10, \"hash_ids\": [0]}\n\
            {\"timestamp\": 1500, \"input_length\": 300, \"output_length\": 30, \"hash_ids\": [1, 2]}\n\n\
            {\"timestamp\": 1900, \"input_length\": 200, \"output_length\": 20, \"hash_ids\": []}\n";
        let opts = LoadOptions {
            scale: 2.0,
            ..Default::default()
        };
        let t = parse("mc", text, &opts).unwrap();
        assert_eq!(t.arrivals, vec![2.0, 4.0]);
        assert_eq!(t.mean_input_tokens, 200.0);
    }

    #[test]
    fn mooncake_bad_json_is_a_clear_error() {
        let text =
            "{\"timestamp\": 0, \"input_length\": 100, \"output_length\": 10}\n{\"timestamp\": 5\n";
        let e = parse("mc", text, &LoadOptions::default()).unwrap_err();
        assert!(e.to_string().starts_with("mc, line 2:"), "{e}");
    }

    #[test]
    fn servegen_rates_become_seeded_poisson_counts() {
        let text = "window_start_s,total_rate_rps,active_clients\n0,100.0,4\n600,300.0,5\n";
        let opts = LoadOptions {
            tick_s: 10.0,
            scale: 0.5,
            seed: 7,
        };
        let t = parse("sg", text, &opts).unwrap();
        assert_eq!(t.arrivals.len(), 120);
        // First 300 s are at 100 rps * 0.5, the middle is interpolated up to 150 rps.
        let first: f64 = t.arrivals[..30].iter().sum::<f64>() / 300.0;
        assert!((first - 50.0).abs() < 3.0, "{first}");
        let last: f64 = t.arrivals[90..].iter().sum::<f64>() / 300.0;
        assert!((last - 150.0).abs() < 5.0, "{last}");
        assert!(t.arrivals.iter().all(|a| a.fract() == 0.0));
        assert_eq!(
            t,
            parse("sg", text, &opts).unwrap(),
            "same seed, same arrivals"
        );
        let other = parse("sg", text, &LoadOptions { seed: 8, ..opts }).unwrap();
        assert_ne!(t.arrivals, other.arrivals);
    }

    #[test]
    fn servegen_rejects_decreasing_windows_and_missing_columns() {
        let text = "window_start_s,total_rate_rps\n600,1\n0,2\n";
        let e = parse("sg", text, &LoadOptions::default()).unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
        let e = parse("sg", "window_start_s,rate\n0,1\n", &LoadOptions::default()).unwrap_err();
        assert!(e.to_string().contains("total_rate_rps"), "{e}");
    }

    #[test]
    fn unknown_format_and_empty() {
        let e = parse("x", "hello,world\n1,2\n", &LoadOptions::default()).unwrap_err();
        assert!(matches!(e, TraceError::UnknownFormat { .. }), "{e}");
        let e = parse(
            "x",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n",
            &LoadOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(e, TraceError::Empty { .. }), "{e}");
        let e = parse(
            "x",
            AZURE,
            &LoadOptions {
                tick_s: 0.0,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, TraceError::Option(_)), "{e}");
    }
}
