//! Reads a metrics [`Snapshot`] from Prometheus' HTTP API (prometheus-http-query). Every query
//! is built in [`super::promql`], which documents the metric it reads.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use prometheus_http_query::Client;

use super::promql::{Scope, Tier};
use crate::autoscaler::{SiteSample, Snapshot, TierSample};
use crate::children::ChildKind;

/// Why no snapshot could be read, in words for the `MetricsAvailable` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// CamelCase condition reason.
    pub reason: &'static str,
    pub message: String,
}

impl Unavailable {
    fn query(e: impl std::fmt::Display) -> Self {
        Unavailable {
            reason: "PrometheusUnavailable",
            message: format!("querying Prometheus failed: {e}"),
        }
    }
}

/// One query must answer within this; a hung Prometheus must not stall every service.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Source {
    client: Client,
}

/// Arrivals read back by [`Source::history`]: `(unix_s, rps)` of the cloud tier and of each
/// edge site that has any.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histories {
    pub cloud: Vec<(f64, f64)>,
    pub sites: BTreeMap<String, Vec<(f64, f64)>>,
}

/// `(labels, value)` of every series an instant query returned.
type Series = Vec<(HashMap<String, String>, f64)>;

impl Source {
    pub fn new(url: &str) -> Result<Self, Unavailable> {
        // reqwest is built without a bundled crypto provider; ring (kube's) is the process's.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::try_from(url).map_err(|e| Unavailable {
            reason: "InvalidPrometheusUrl",
            message: format!("prometheus URL {url:?}: {e}"),
        })?;
        Ok(Source { client })
    }

    async fn instant(&self, q: &str) -> Result<Series, Unavailable> {
        let res = tokio::time::timeout(QUERY_TIMEOUT, self.client.query(q).get())
            .await
            .map_err(|_| Unavailable::query("timed out"))?
            .map_err(Unavailable::query)?;
        let Some(v) = res.data().as_vector() else {
            return Err(Unavailable::query(format!("{q}: not an instant vector")));
        };
        Ok(v.iter()
            .map(|s| (s.metric().clone(), s.sample().value()))
            .filter(|(_, v)| v.is_finite())
            .collect())
    }

    async fn scalar(&self, q: &str) -> Result<Option<f64>, Unavailable> {
        Ok(self.instant(q).await?.first().map(|(_, v)| *v))
    }

    async fn by_site(&self, q: &str) -> Result<BTreeMap<String, f64>, Unavailable> {
        Ok(self
            .instant(q)
            .await?
            .into_iter()
            .filter_map(|(m, v)| Some((m.get("tidal_edge_node")?.clone(), v)))
            .collect())
    }

    /// Every series of a range query over `[start, end]` at `step_s`: `(labels, points)`.
    async fn range(
        &self,
        q: &str,
        start: i64,
        end: i64,
        step_s: f64,
    ) -> Result<Vec<(HashMap<String, String>, Vec<(f64, f64)>)>, Unavailable> {
        let res = tokio::time::timeout(
            QUERY_TIMEOUT,
            self.client.query_range(q, start, end, step_s).get(),
        )
        .await
        .map_err(|_| Unavailable::query("timed out"))?
        .map_err(Unavailable::query)?;
        let Some(m) = res.data().as_matrix() else {
            return Err(Unavailable::query(format!("{q}: not a range vector")));
        };
        Ok(m.iter()
            .map(|series| {
                let pts = series
                    .samples()
                    .iter()
                    .map(|s| (s.timestamp(), s.value()))
                    .filter(|(_, v)| v.is_finite())
                    .collect();
                (series.metric().clone(), pts)
            })
            .collect())
    }

    /// The arrivals of the cloud tier and of each of `sites` (its own workers' plus what
    /// reached the cloud through its Service) over `[start, end]`, one point per `step_s`
    /// (each the rate over the scope's window), to seed the forecasters when a loop (re)starts.
    pub async fn history(
        &self,
        scope: &Scope,
        sites: &[String],
        start: i64,
        end: i64,
        step_s: f64,
    ) -> Result<Histories, Unavailable> {
        let cloud = self
            .range(&scope.arrival_rps(Tier::Cloud), start, end, step_s)
            .await?
            .into_iter()
            .next()
            .map(|(_, pts)| pts)
            .unwrap_or_default();
        let mut by_site: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
        if !sites.is_empty() {
            let own = self
                .range(&scope.arrival_rps(Tier::Edge), start, end, step_s)
                .await?;
            let routed = self
                .range(&scope.routed_site_rps(), start, end, step_s)
                .await?;
            let service_of =
                |site: &String| ChildKind::Edge(site.clone()).service_name(&scope.service);
            let series = own
                .into_iter()
                .filter_map(|(m, pts)| Some((m.get("tidal_edge_node")?.clone(), pts)))
                .chain(routed.into_iter().filter_map(|(m, pts)| {
                    let svc = m.get("site")?;
                    Some((sites.iter().find(|s| service_of(s) == *svc)?.clone(), pts))
                }));
            for (site, pts) in series {
                if !sites.contains(&site) {
                    continue;
                }
                let sum = by_site.entry(site).or_default();
                for (t, v) in pts {
                    // Millisecond keys: both queries share the same evaluation times.
                    *sum.entry((t * 1000.0).round() as i64).or_insert(0.0) += v;
                }
            }
        }
        Ok(Histories {
            cloud,
            sites: by_site
                .into_iter()
                .map(|(s, pts)| {
                    (
                        s,
                        pts.into_iter()
                            .map(|(t, v)| (t as f64 / 1000.0, v))
                            .collect(),
                    )
                })
                .collect(),
        })
    }

    /// One snapshot. `sites` are the edge sites the service runs on, with whether each is
    /// online (from its EdgeNode); `experts` asks for per-expert token rates.
    pub async fn snapshot(
        &self,
        scope: &Scope,
        sites: &BTreeMap<String, bool>,
        experts: Option<u32>,
    ) -> Result<Snapshot, Unavailable> {
        let Some(time_s) = self.scalar(&scope.last_scrape()).await? else {
            return Err(Unavailable {
                reason: "NoWorkerMetrics",
                message: format!(
                    "Prometheus has no tidal_worker_ready series for {}/{}: are the workers scraped?",
                    scope.namespace, scope.service
                ),
            });
        };
        if let Some(missing) = self.scalar(&scope.missing_gauges()).await?
            && missing > 0.0
        {
            return Err(Unavailable {
                reason: "PartialMetrics",
                message: format!(
                    "Prometheus lacks {missing} of the queue-depth and running gauges of {}/{}'s \
                     scraped cloud workers: partial data, holding",
                    scope.namespace, scope.service
                ),
            });
        }
        let cloud = TierSample {
            arrival_rps: self
                .scalar(&scope.arrival_rps(Tier::Cloud))
                .await?
                .unwrap_or(0.0),
            served_rps: self
                .scalar(&scope.served_rps(Tier::Cloud))
                .await?
                .unwrap_or(0.0),
            queue_depth: self
                .scalar(&scope.queue_depth(Tier::Cloud))
                .await?
                .unwrap_or(0.0),
            running: self
                .scalar(&scope.running(Tier::Cloud))
                .await?
                .unwrap_or(0.0),
            // NaN (no requests in the window) was filtered out: no latency to judge.
            ttft_p95_s: self.scalar(&scope.ttft_p95(Tier::Cloud)).await?,
            tpot_p95_s: self.scalar(&scope.tpot_p95(Tier::Cloud)).await?,
        };
        let mut edge = BTreeMap::new();
        if !sites.is_empty() {
            let arrivals = self.by_site(&scope.arrival_rps(Tier::Edge)).await?;
            let served = self.by_site(&scope.served_rps(Tier::Edge)).await?;
            let queue = self.by_site(&scope.queue_depth(Tier::Edge)).await?;
            let running = self.by_site(&scope.running(Tier::Edge)).await?;
            let ttft = self.by_site(&scope.ttft_p95(Tier::Edge)).await?;
            let tpot = self.by_site(&scope.tpot_p95(Tier::Edge)).await?;
            let routed: BTreeMap<String, f64> = self
                .instant(&scope.routed_site_rps())
                .await?
                .into_iter()
                .filter_map(|(m, v)| Some((m.get("site")?.clone(), v)))
                .collect();
            for (site, online) in sites {
                let load = site_arrivals(
                    arrivals.get(site).copied(),
                    routed
                        .get(&ChildKind::Edge(site.clone()).service_name(&scope.service))
                        .copied(),
                )
                .map(|a| TierSample {
                    arrival_rps: a,
                    served_rps: served.get(site).copied().unwrap_or(0.0),
                    queue_depth: queue.get(site).copied().unwrap_or(0.0),
                    running: running.get(site).copied().unwrap_or(0.0),
                    ttft_p95_s: ttft.get(site).copied(),
                    tpot_p95_s: tpot.get(site).copied(),
                });
                edge.insert(
                    site.clone(),
                    SiteSample {
                        online: *online,
                        load,
                    },
                );
            }
        }
        let expert_tokens_per_s = match experts {
            None => None,
            Some(n) => {
                let series = self.instant(&scope.expert_tokens()).await?;
                if series.is_empty() {
                    None
                } else {
                    let mut per = vec![0.0; n as usize];
                    for (m, v) in series {
                        if let Some(e) = m.get("expert").and_then(|e| e.parse::<usize>().ok())
                            && e < per.len()
                        {
                            per[e] += v;
                        }
                    }
                    Some(per)
                }
            }
        };
        Ok(Snapshot {
            time_s,
            cloud: Some(cloud),
            edge,
            expert_tokens_per_s,
        })
    }
}

/// A site's demand: what its own workers saw plus what reached the cloud tier through its
/// Service (while it had no ready replica); `None` when neither has a series.
fn site_arrivals(own: Option<f64>, via_cloud: Option<f64>) -> Option<f64> {
    match (own, via_cloud) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    }
}

#[cfg(test)]
mod tests {
    //! A fake Prometheus over real HTTP: what the autoscaler does with garbage, a wrong
    //! result type and partial series (#17: no decision on partial data).
    use super::*;
    use axum::extract::Query;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use serde_json::json;

    #[test]
    fn a_site_demand_adds_what_reached_the_cloud_through_its_service() {
        assert_eq!(site_arrivals(None, None), None, "no series: no data");
        assert_eq!(site_arrivals(Some(2.0), None), Some(2.0));
        assert_eq!(site_arrivals(None, Some(0.5)), Some(0.5), "asleep");
        assert_eq!(site_arrivals(Some(2.0), Some(0.5)), Some(2.5), "waking");
    }

    /// How the fake answers.
    #[derive(Clone, Copy)]
    enum Fake {
        /// Every query answered as a healthy Prometheus would, for two workers.
        Healthy,
        /// 500 with a body that is not Prometheus' JSON.
        ServerError,
        /// 200 with a body that is not JSON.
        Garbage,
        /// Instant queries answered with a range matrix.
        WrongType,
        /// One of the two workers lacks its queue-depth gauge.
        Partial,
    }

    fn vector(value: f64) -> serde_json::Value {
        json!({"status": "success", "data": {"resultType": "vector",
            "result": [{"metric": {}, "value": [1.7e9, value.to_string()]}]}})
    }

    fn answer(fake: Fake, query: &str) -> Response {
        match fake {
            Fake::ServerError => {
                (StatusCode::INTERNAL_SERVER_ERROR, "<html>oops</html>").into_response()
            }
            Fake::Garbage => (StatusCode::OK, "not json {").into_response(),
            Fake::WrongType => axum::Json(json!({"status": "success", "data": {
                "resultType": "matrix", "result": [{"metric": {}, "values": [[1.7e9, "1"]]}]}}))
            .into_response(),
            Fake::Healthy | Fake::Partial => {
                let body = if query.starts_with("max(timestamp(") {
                    vector(1.7e9)
                } else if query.starts_with("count(tidal_worker_ready") {
                    // 2 workers x 2 gauges, minus what Prometheus has.
                    vector(if matches!(fake, Fake::Partial) {
                        1.0
                    } else {
                        0.0
                    })
                } else if query.contains("tidal_worker_queue_depth") {
                    vector(3.0)
                } else if query.contains("tidal_worker_requests_total") {
                    vector(2.5)
                } else {
                    json!({"status": "success", "data": {"resultType": "vector", "result": []}})
                };
                axum::Json(body).into_response()
            }
        }
    }

    async fn prometheus(fake: Fake) -> String {
        let app = axum::Router::new().route(
            "/api/v1/query",
            // The source sends instant queries as GETs (`.get()`).
            axum::routing::get(move |Query(q): Query<HashMap<String, String>>| async move {
                answer(fake, q.get("query").map(String::as_str).unwrap_or_default())
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn scope() -> Scope {
        Scope {
            namespace: "ns".into(),
            service: "svc".into(),
            window: "1m".into(),
        }
    }

    async fn snapshot(fake: Fake) -> Result<Snapshot, Unavailable> {
        let source = Source::new(&prometheus(fake).await).unwrap();
        source.snapshot(&scope(), &BTreeMap::new(), None).await
    }

    #[tokio::test]
    async fn a_healthy_prometheus_gives_a_snapshot() {
        let s = snapshot(Fake::Healthy).await.unwrap();
        let cloud = s.cloud.unwrap();
        assert_eq!(cloud.arrival_rps, 2.5);
        assert_eq!(cloud.queue_depth, 3.0);
    }

    #[tokio::test]
    async fn garbage_and_wrong_answers_are_unavailable_with_the_reason() {
        for fake in [Fake::ServerError, Fake::Garbage, Fake::WrongType] {
            let e = snapshot(fake).await.unwrap_err();
            assert_eq!(e.reason, "PrometheusUnavailable", "{e:?}");
            assert!(e.message.starts_with("querying Prometheus failed"), "{e:?}");
        }
    }

    #[tokio::test]
    async fn a_worker_missing_its_gauges_is_partial_data_not_an_idle_worker() {
        let e = snapshot(Fake::Partial).await.unwrap_err();
        assert_eq!(e.reason, "PartialMetrics", "{e:?}");
        assert!(e.message.contains("ns/svc"), "{e:?}");
    }
}
