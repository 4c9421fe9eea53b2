//! The `router` role's side of expert disaggregation: sends each MoE layer's
//! routed hidden states to the expert shards of the placement plan and adds up
//! their answers.
//!
//! - One persistent HTTP/2 (prior knowledge, h2c) connection per replica,
//!   multiplexing every concurrent layer message; reconnects on demand. PINGs find a
//!   replica that hangs (accepts, never answers) in seconds.
//! - Per layer, one message per shard holding the tokens routed to its experts
//!   ([`crate::disagg::wire`]); all shards are called concurrently. An expert listed by
//!   several shards has its tokens split across them round-robin by the token's
//!   order among that expert's tokens (deterministic, and every expert's output for
//!   a row is bitwise independent of the split).
//! - Replicas of a shard are balanced round-robin; a connection error, timeout or
//!   5xx marks the replica down for a moment (doubling while it keeps failing) and
//!   retries on the next one; a shard with a single address is tried twice, on a new
//!   connection. When every attempt fails, the forward pass fails naming the shard.
//! - The plan file is polled every second and re-resolved (DNS for shards given by
//!   `endpoint`) every few seconds; a new routing table is swapped in atomically and
//!   each layer call finishes on the table it started with (if that fails and the
//!   table changed meanwhile, the layer is retried once on the new one).

use crate::disagg::metrics::ShardMetrics;
use crate::disagg::placement::{Plan, PlanFile, endpoint};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::decoder::Model;
use crate::model::loader::Loaded;
use crate::model::moe::{ExpertPlacement, RemoteExperts, Routes};
use crate::serve::metrics::Metrics;
use crate::serve::text::TextCodec;
use crate::serve::tls::TrustedCa;
use bytes::Bytes;
use candle_core::{DType, Tensor};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;

/// Settings of the router's shard client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Limit for one attempt (connect + request + response) on one replica.
    pub attempt_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long a replica that failed is skipped (unless no other is left).
    pub down_for: Duration,
    /// Plan file poll period.
    pub poll_every: Duration,
    /// DNS re-resolution period (shards without explicit `endpoints`).
    pub resolve_every: Duration,
    /// HTTP/2 PING period on every connection. A replica that accepts but never answers
    /// (hung, frozen, its node partitioned) fails its calls after one missed PING instead
    /// of at `attempt_timeout`.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered.
    pub keepalive_timeout: Duration,
    /// The CAs `https://` shard endpoints are verified against (`--shard-ca-file`).
    pub tls: Option<Arc<TrustedCa>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
            down_for: Duration::from_secs(2),
            poll_every: Duration::from_secs(1),
            resolve_every: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// One replica of a shard: an address and its (lazily opened) HTTP/2 connection.
struct Replica {
    /// `host:port`.
    addr: String,
    /// For an `https://` endpoint, the name its certificate must carry.
    tls_host: Option<String>,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
    down_until: Mutex<Option<Instant>>,
    /// Failures in a row: each doubles how long the replica is skipped (up to
    /// [`MAX_DOWN_FOR`]), so a dead pod still listed by DNS (up to the record's TTL)
    /// costs a connect attempt only now and then.
    failures: AtomicU32,
}

/// The longest a failing replica is skipped.
const MAX_DOWN_FOR: Duration = Duration::from_secs(30);

impl Replica {
    fn new(addr: String, tls_host: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            addr,
            tls_host,
            conn: tokio::sync::Mutex::new(None),
            down_until: Mutex::new(None),
            failures: AtomicU32::new(0),
        })
    }

    fn is_down(&self) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }

    fn mark_down(&self, base: Duration) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(5);
        let for_ = (base * (1 << n)).min(MAX_DOWN_FOR.max(base));
        *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + for_);
    }

    fn mark_up(&self) {
        self.failures.store(0, Ordering::Relaxed);
        *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    async fn sender(&self, cfg: &ClientConfig) -> Result<SendRequest<Full<Bytes>>> {
        let connect_timeout = cfg.connect_timeout;
        let mut slot = self.conn.lock().await;
        if let Some(s) = slot.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        *slot = None;
        let stream =
            tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(&self.addr))
                .await
                .map_err(|_| Error::ConnectTimeout {
                    addr: self.addr.clone(),
                })?
                .map_err(|source| Error::Connect {
                    addr: self.addr.clone(),
                    source,
                })?;
        let _ = stream.set_nodelay(true);
        let mut builder =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(32 << 20)
            .max_frame_size(1 << 20)
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(cfg.keepalive_interval)
            .keep_alive_timeout(cfg.keepalive_timeout)
            .keep_alive_while_idle(true);
        let handshake_err = |source| Error::Handshake {
            addr: self.addr.clone(),
            source,
        };
        let (sender, conn) = match &self.tls_host {
            None => {
                let (sender, conn) = builder
                    .handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(handshake_err)?;
                (sender, futures::future::Either::Left(conn))
            }
            Some(host) => {
                let tls = self.tls_connect(cfg, host, stream).await?;
                let (sender, conn) = builder
                    .handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(handshake_err)?;
                (sender, futures::future::Either::Right(conn))
            }
        };
        let addr = self.addr.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "expert shard connection closed");
            }
        });
        *slot = Some(sender.clone());
        Ok(sender)
    }

    /// TLS over `stream`, verifying the shard's certificate names `host`.
    async fn tls_connect(
        &self,
        cfg: &ClientConfig,
        host: &str,
        stream: tokio::net::TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tls_err = |why: String| Error::Tls(format!("expert shard {}: {why}", self.addr));
        let ca = cfg
            .tls
            .as_ref()
            .ok_or_else(|| tls_err("an https:// endpoint needs --shard-ca-file".into()))?;
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| tls_err(e.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(ca.client_config());
        tokio::time::timeout(cfg.connect_timeout, connector.connect(name, stream))
            .await
            .map_err(|_| Error::ConnectTimeout {
                addr: self.addr.clone(),
            })?
            .map_err(|e| tls_err(e.to_string()))
    }

    async fn drop_conn(&self) {
        *self.conn.lock().await = None;
    }
}

/// The replicas of one shard.
struct Pool {
    shard: usize,
    replicas: Vec<Arc<Replica>>,
    next: AtomicUsize,
}

/// A plan with its replicas resolved.
struct Routing {
    plan: Arc<Plan>,
    /// Per expert, the shards (ascending) holding it.
    holders: Vec<Vec<usize>>,
    pools: BTreeMap<usize, Arc<Pool>>,
}

/// Why an attempt failed, and whether another replica may do better.
struct AttemptError {
    message: String,
    retry: bool,
}

/// Sends MoE layers to expert shards. Implements [`RemoteExperts`] for the model.
pub struct ShardClient {
    handle: Handle,
    cfg: ClientConfig,
    plan_file: Arc<PlanFile>,
    routing: RwLock<Arc<Routing>>,
    rebuild: tokio::sync::Mutex<()>,
    /// Experts the model has (0 until the model's config is known).
    num_experts: AtomicUsize,
    metrics: Arc<Metrics>,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    closed: std::sync::atomic::AtomicBool,
}

impl Drop for ShardClient {
    fn drop(&mut self) {
        if let Some(w) = self
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            w.abort();
        }
    }
}

async fn resolve_pools(plan: &Plan, old: Option<&Routing>) -> BTreeMap<usize, Arc<Pool>> {
    // A replica is the same one again when its address and TLS name are.
    let key = |addr: &str, tls: &Option<String>| format!("{addr}|{tls:?}");
    let mut known: HashMap<String, Arc<Replica>> = HashMap::new();
    if let Some(old) = old {
        for pool in old.pools.values() {
            for r in &pool.replicas {
                known.insert(key(&r.addr, &r.tls_host), r.clone());
            }
        }
    }
    let mut pools = BTreeMap::new();
    for spec in &plan.shards {
        let mut addrs: Vec<(String, Option<String>)> = vec![];
        match spec.endpoints.as_ref().filter(|v| !v.is_empty()) {
            Some(urls) => {
                for u in urls {
                    match endpoint(u) {
                        Ok(e) => addrs.push((e.authority, e.tls_host)),
                        Err(e) => tracing::warn!(shard = spec.shard, error = %e, "bad endpoint"),
                    }
                }
            }
            None => {
                let url = spec.endpoint.clone().unwrap_or_default();
                match endpoint(&url) {
                    Ok(ep) => match tokio::net::lookup_host(ep.authority.as_str()).await {
                        Ok(found) => {
                            let mut found: Vec<String> = found.map(|s| s.to_string()).collect();
                            found.sort();
                            found.dedup();
                            addrs.extend(found.into_iter().map(|a| (a, ep.tls_host.clone())));
                        }
                        Err(e) => {
                            // A failed lookup (DNS restarting; no Ready pod behind a headless
                            // Service) keeps the addresses known for this same endpoint.
                            let last = old.and_then(|o| o.last_addresses(spec.shard, &url));
                            tracing::warn!(shard = spec.shard, endpoint = %url, error = %e,
                                kept = last.as_ref().map_or(0, Vec::len),
                                "cannot resolve expert shard endpoint");
                            addrs.extend(
                                last.unwrap_or_default()
                                    .into_iter()
                                    .map(|a| (a, ep.tls_host.clone())),
                            );
                        }
                    },
                    Err(e) => tracing::warn!(shard = spec.shard, error = %e, "bad endpoint"),
                }
            }
        }
        let replicas = addrs
            .into_iter()
            .map(|(a, tls)| {
                known
                    .get(&key(&a, &tls))
                    .cloned()
                    .unwrap_or_else(|| Replica::new(a, tls))
            })
            .collect();
        let next = old
            .and_then(|o| o.pools.get(&spec.shard))
            .map_or(0, |p| p.next.load(Ordering::Relaxed));
        pools.insert(
            spec.shard,
            Arc::new(Pool {
                shard: spec.shard,
                replicas,
                next: AtomicUsize::new(next),
            }),
        );
    }
    pools
}

impl Routing {
    /// The addresses `shard` had when it was reached through `endpoint` (DNS).
    fn last_addresses(&self, shard: usize, endpoint: &str) -> Option<Vec<String>> {
        let same = self.plan.shards.iter().any(|s| {
            s.shard == shard
                && s.endpoint.as_deref() == Some(endpoint)
                && s.endpoints.as_ref().is_none_or(Vec::is_empty)
        });
        let pool = self.pools.get(&shard).filter(|_| same)?;
        Some(pool.replicas.iter().map(|r| r.addr.clone()).collect())
    }
}

fn routing_for(plan: Arc<Plan>, pools: BTreeMap<usize, Arc<Pool>>) -> Routing {
    let holders = (0..plan.num_experts).map(|e| plan.holders(e)).collect();
    Routing {
        plan,
        holders,
        pools,
    }
}

impl ShardClient {
    /// Reads the plan, resolves its replicas and starts watching the file. Must be
    /// called inside a tokio runtime, whose handle the client keeps: forward passes
    /// ([`RemoteExperts::forward`]) block on it and so must run outside the
    /// runtime's worker threads (the engine thread, `spawn_blocking`).
    pub async fn start(
        plan_path: &Path,
        cfg: ClientConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>> {
        let plan_file = PlanFile::open(plan_path)?;
        let plan = plan_file.current();
        let pools = resolve_pools(&plan, None).await;
        metrics.shards.placement_version.set(plan.version as i64);
        let client = Arc::new(Self {
            handle: Handle::current(),
            routing: RwLock::new(Arc::new(routing_for(plan, pools))),
            plan_file,
            rebuild: tokio::sync::Mutex::new(()),
            num_experts: AtomicUsize::new(0),
            metrics,
            watcher: Mutex::new(None),
            closed: std::sync::atomic::AtomicBool::new(false),
            cfg,
        });
        let weak = Arc::downgrade(&client);
        let every = client.cfg.poll_every;
        let resolve_every = client.cfg.resolve_every;
        let task = tokio::spawn(async move {
            let mut last_resolve = Instant::now();
            loop {
                tokio::time::sleep(every).await;
                let Some(c) = weak.upgrade() else { return };
                let n = c.num_experts.load(Ordering::Relaxed);
                let changed = c
                    .plan_file
                    .poll(|p| if n > 0 { p.check_covers(n) } else { Ok(()) });
                match changed {
                    Ok(Some(plan)) => {
                        tracing::info!(version = plan.version, "placement plan reloaded");
                        c.refresh(plan).await;
                        last_resolve = Instant::now();
                    }
                    Ok(None) if last_resolve.elapsed() >= resolve_every => {
                        let plan = c.plan_file.current();
                        c.refresh(plan).await;
                        last_resolve = Instant::now();
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "placement plan not reloaded; keeping the previous one")
                    }
                }
            }
        });
        *client.watcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(client)
    }

    /// Resolves `plan`'s replicas and swaps the routing table.
    async fn refresh(&self, plan: Arc<Plan>) {
        let _guard = self.rebuild.lock().await;
        let old = self.routing();
        let pools = resolve_pools(&plan, Some(&old)).await;
        self.metrics
            .shards
            .placement_version
            .set(plan.version as i64);
        *self.routing.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(routing_for(plan, pools));
    }

    fn routing(&self) -> Arc<Routing> {
        self.routing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The plan in use.
    pub fn plan(&self) -> Arc<Plan> {
        self.routing().plan.clone()
    }

    /// Replica addresses per shard in the routing table in use.
    pub fn replicas(&self) -> BTreeMap<usize, Vec<String>> {
        self.routing()
            .pools
            .iter()
            .map(|(s, p)| (*s, p.replicas.iter().map(|r| r.addr.clone()).collect()))
            .collect()
    }

    /// Stops a router's warm-up wait (on shutdown); forward passes still work.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Binds the client to a model with `num_experts` experts: the current plan
    /// must serve all of them, and later plans that do not are ignored.
    pub fn bind_model(&self, num_experts: usize) -> Result<()> {
        self.plan_file.current().check_covers(num_experts)?;
        self.num_experts.store(num_experts, Ordering::Relaxed);
        Ok(())
    }

    async fn attempt(
        &self,
        replica: &Replica,
        body: Bytes,
    ) -> std::result::Result<Bytes, AttemptError> {
        let retry = |message: String| AttemptError {
            message,
            retry: true,
        };
        let work = async {
            let mut sender = replica
                .sender(&self.cfg)
                .await
                .map_err(|e| retry(e.to_string()))?;
            if let Err(e) = sender.ready().await {
                replica.drop_conn().await;
                return Err(retry(format!("{}: {e}", replica.addr)));
            }
            let req = hyper::Request::post(format!(
                "http://{}{}",
                replica.addr,
                crate::disagg::wire::PATH
            ))
            .header(
                hyper::header::CONTENT_TYPE,
                crate::disagg::wire::CONTENT_TYPE,
            )
            .body(Full::new(body))
            .map_err(|e| AttemptError {
                message: e.to_string(),
                retry: false,
            })?;
            let resp = match sender.send_request(req).await {
                Ok(r) => r,
                Err(e) => {
                    replica.drop_conn().await;
                    return Err(retry(format!("{}: {e}", replica.addr)));
                }
            };
            let status = resp.status();
            let bytes = match resp.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    replica.drop_conn().await;
                    return Err(retry(format!("{}: reading the answer: {e}", replica.addr)));
                }
            };
            if status.is_success() {
                Ok(bytes)
            } else {
                Err(AttemptError {
                    message: format!(
                        "{} answered {status}: {}",
                        replica.addr,
                        String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                    ),
                    retry: status.is_server_error(),
                })
            }
        };
        match tokio::time::timeout(self.cfg.attempt_timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                replica.drop_conn().await;
                Err(retry(format!(
                    "{}: no answer within {:?}",
                    replica.addr, self.cfg.attempt_timeout
                )))
            }
        }
    }

    /// Sends `body` to one replica of `pool`, trying the others on failure.
    async fn call_shard(&self, pool: &Pool, body: Bytes) -> Result<Bytes> {
        let n = pool.replicas.len();
        let labels = ShardMetrics::shard(pool.shard);
        if n == 0 {
            self.metrics.shards.failures.get_or_create(&labels).inc();
            return Err(Error::NoReplica { shard: pool.shard });
        }
        let start = pool.next.fetch_add(1, Ordering::Relaxed);
        // Replicas not marked down first, in round-robin order, then the others.
        let mut order: Vec<&Arc<Replica>> =
            (0..n).map(|i| &pool.replicas[(start + i) % n]).collect();
        order.sort_by_key(|r| r.is_down());
        // One address may stand for several pods (a ClusterIP, a load balancer): a second
        // attempt on a new connection may reach a live one.
        if n == 1 {
            order.push(order[0]);
        }
        let mut errors = vec![];
        for (i, replica) in order.into_iter().enumerate() {
            if i > 0 {
                self.metrics.shards.retries.get_or_create(&labels).inc();
            }
            match self.attempt(replica, body.clone()).await {
                Ok(bytes) => {
                    replica.mark_up();
                    return Ok(bytes);
                }
                Err(e) => {
                    tracing::warn!(shard = pool.shard, error = %e.message, "expert shard attempt failed");
                    errors.push(e.message);
                    if !e.retry {
                        break;
                    }
                    replica.mark_down(self.cfg.down_for);
                }
            }
        }
        self.metrics.shards.failures.get_or_create(&labels).inc();
        Err(Error::ShardUnavailable {
            shard: pool.shard,
            errors: errors.join("; "),
        })
    }

    async fn forward_on(
        &self,
        routing: &Routing,
        layer: usize,
        xs: &Tensor,
        routes: &[Vec<(usize, f32)>],
    ) -> Result<Tensor> {
        let (_, hidden) = xs.dims2()?;
        // Per shard: the rows it gets and their routes restricted to its experts.
        let mut parts: BTreeMap<usize, (Vec<u32>, Routes)> = BTreeMap::new();
        let mut ordinal = vec![0usize; routing.holders.len()];
        for (row, r) in routes.iter().enumerate() {
            for &(e, w) in r {
                let holders = routing.holders.get(e).map_or(&[][..], Vec::as_slice);
                if holders.is_empty() {
                    return Err(Error::PlanMismatch(format!(
                        "placement plan version {} assigns no shard to expert {e}",
                        routing.plan.version
                    )));
                }
                let shard = holders[ordinal[e] % holders.len()];
                ordinal[e] += 1;
                let (rows, rs) = parts.entry(shard).or_default();
                if rows.last() != Some(&(row as u32)) {
                    rows.push(row as u32);
                    rs.push(vec![]);
                }
                rs.last_mut().expect("pushed above").push((e, w));
            }
        }
        let mut calls = vec![];
        for (shard, (rows, rs)) in &parts {
            let pool = routing.pools.get(shard).ok_or_else(|| {
                Error::PlanMismatch(format!("expert shard {shard} is not in the placement plan"))
            })?;
            let idx = Tensor::new(rows.as_slice(), xs.device())?;
            let sub = xs.index_select(&idx, 0)?;
            let body = Bytes::from(crate::disagg::wire::encode_request(layer, &sub, rs)?);
            self.metrics.shards.add_bytes("sent", body.len());
            calls.push(async move {
                let t0 = Instant::now();
                let r = self.call_shard(pool, body).await;
                self.metrics
                    .shards
                    .request_seconds
                    .get_or_create(&ShardMetrics::shard(pool.shard))
                    .observe(t0.elapsed().as_secs_f64());
                (idx, rows.len(), r)
            });
        }
        let answers = futures::future::join_all(calls).await;
        let mut ys = xs.zeros_like()?;
        for (idx, n, r) in answers {
            let bytes = r?;
            self.metrics.shards.add_bytes("received", bytes.len());
            let part = crate::disagg::wire::decode_response(&bytes, n, hidden, xs.dtype())?;
            ys = ys.index_add(&idx, &part, 0)?;
        }
        Ok(ys)
    }
}

impl RemoteExperts for ShardClient {
    fn forward(&self, layer: usize, xs: &Tensor, routes: &[Vec<(usize, f32)>]) -> Result<Tensor> {
        let routing = self.routing();
        match self
            .handle
            .block_on(self.forward_on(&routing, layer, xs, routes))
        {
            Ok(ys) => Ok(ys),
            Err(e) => {
                let now = self.routing();
                if Arc::ptr_eq(&now, &routing) {
                    return Err(e);
                }
                tracing::warn!(error = %e, "layer failed on the previous placement; retrying on the new one");
                self.handle
                    .block_on(self.forward_on(&now, layer, xs, routes))
            }
        }
    }
}

/// Loads a MoE checkpoint (safetensors or GGUF) as the `router` role: everything but the
/// expert FFNs, which `client`'s shards serve. Warms up with one token, waiting (up to
/// `warmup_for`) for the shards to answer, so readiness means the shards are
/// reachable. Call outside the runtime's worker threads (e.g. `spawn_blocking`).
pub fn load_router(
    source: &str,
    dtype: DType,
    client: Arc<ShardClient>,
    warmup_for: Duration,
) -> Result<Loaded> {
    let dir = crate::model::hub::resolve(source)?;
    let gguf = crate::model::loader::open_gguf(&dir)?;
    let cfg = match &gguf {
        Some(file) => file.config()?,
        None => ModelConfig::from_file(&dir.join("config.json"))?,
    };
    if !cfg.is_moe() {
        return Err(Error::Unsupported(
            "the router role needs a MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2)".into(),
        ));
    }
    client.bind_model(cfg.num_experts)?;
    let warm_token = cfg.bos_token_id.unwrap_or(0);
    let remote = ExpertPlacement::Remote(client.clone());
    let (model, codec) = match gguf {
        Some(file) => (
            Model::load_gguf(file.clone(), remote)?,
            crate::model::loader::gguf_codec(&file, &cfg)?,
        ),
        None => (
            Model::load_dir_with(&dir, cfg.clone(), dtype, remote)?,
            TextCodec::load(&dir, &cfg.eos_token_ids)?,
        ),
    };
    let started = Instant::now();
    let mut logged = false;
    loop {
        let mut cache = model.new_cache();
        match model.forward(&[warm_token], &mut cache) {
            Ok(_) => break,
            Err(e) if started.elapsed() < warmup_for && !client.is_closed() => {
                if !logged {
                    tracing::warn!(error = %e, "expert shards not answering yet; retrying the warm-up");
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
    tracing::info!(dir = %dir.display(), ?dtype, "router loaded (experts on shards)");
    Ok(Loaded {
        model: Arc::new(model),
        codec: Arc::new(codec),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down_for(r: &Replica) -> Duration {
        let until = r.down_until.lock().unwrap().expect("marked down");
        until.saturating_duration_since(Instant::now())
    }

    #[tokio::test]
    async fn a_failed_lookup_keeps_the_last_addresses_of_the_same_endpoint() {
        use crate::disagg::placement::ShardSpec;
        let plan = |endpoint: &str| {
            Arc::new(Plan {
                version: 1,
                num_experts: 1,
                shards: vec![ShardSpec {
                    shard: 0,
                    experts: vec![0],
                    endpoint: Some(endpoint.into()),
                    endpoints: None,
                    replicas: None,
                    held: vec![],
                }],
            })
        };
        let addrs = |p: &BTreeMap<usize, Arc<Pool>>| -> Vec<String> {
            p[&0].replicas.iter().map(|r| r.addr.clone()).collect()
        };
        // A NUL byte makes the lookup fail at once, without asking any DNS server.
        let url = "http://shard\0-0:8080";
        let pool = Pool {
            shard: 0,
            replicas: vec![Replica::new("198.18.0.7:8080".into(), None)],
            next: AtomicUsize::new(0),
        };
        let old = routing_for(plan(url), BTreeMap::from([(0, Arc::new(pool))]));
        let pools = resolve_pools(&plan(url), Some(&old)).await;
        assert_eq!(addrs(&pools), ["198.18.0.7:8080"]);
        // The same replica (its connection and health) is carried over.
        assert!(Arc::ptr_eq(
            &pools[&0].replicas[0],
            &old.pools[&0].replicas[0]
        ));
        // A shard now reached through another endpoint keeps nothing.
        let pools = resolve_pools(&plan("http://other\0:8080"), Some(&old)).await;
        assert!(addrs(&pools).is_empty());
        // Nor does a first resolution.
        assert!(addrs(&resolve_pools(&plan(url), None).await).is_empty());
    }

    #[test]
    fn a_replica_failing_again_is_skipped_longer_up_to_a_cap() {
        let r = Replica::new("127.0.0.1:1".into(), None);
        let base = Duration::from_secs(2);
        let mut last = Duration::ZERO;
        for _ in 0..4 {
            r.mark_down(base);
            let d = down_for(&r);
            assert!(d > last, "{d:?} after {last:?}");
            last = d;
        }
        for _ in 0..10 {
            r.mark_down(base);
        }
        assert!(down_for(&r) <= MAX_DOWN_FOR);
        assert!(down_for(&r) > MAX_DOWN_FOR / 2);
        // One success and the next failure is short again.
        r.mark_up();
        assert!(!r.is_down());
        r.mark_down(base);
        assert!(down_for(&r) <= base);
    }
}
