//! The operator's own Prometheus metrics (`/metrics`). Labels are bounded: controller names
//! and error reasons from `Error::reason`, never object names.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub controller: &'static str,
    /// `apply`, `status`, `delete`, `event`.
    pub kind: &'static str,
}

/// One InferenceService (bounded by the number of services, not by traffic).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub namespace: String,
    pub inference_service: String,
}

/// One scaling target of a service: `cloud`, `edge/<edgenode>` or `shard/<k>`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub namespace: String,
    pub inference_service: String,
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub namespace: String,
    pub inference_service: String,
    /// `up`, `down` or `hold`.
    pub direction: &'static str,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// The autoscaler's metrics (what the dashboards plot: forecast vs actual, replicas).
#[derive(Default)]
pub struct AutoscalerMetrics {
    pub observed_rps: Family<TargetLabels, FloatGauge>,
    pub predicted_rps: Family<TargetLabels, FloatGauge>,
    pub lower_rps: Family<TargetLabels, FloatGauge>,
    pub upper_rps: Family<TargetLabels, FloatGauge>,
    pub horizon_seconds: Family<TargetLabels, FloatGauge>,
    pub error_ratio: Family<TargetLabels, FloatGauge>,
    pub upper_exceeded_ratio: Family<TargetLabels, FloatGauge>,
    pub band_coverage_ratio: Family<TargetLabels, FloatGauge>,
    pub upper_level: Family<TargetLabels, FloatGauge>,
    pub desired_replicas: Family<TargetLabels, Gauge>,
    pub current_replicas: Family<TargetLabels, Gauge>,
    pub max_replicas: Family<TargetLabels, Gauge>,
    pub metrics_available: Family<ServiceLabels, Gauge>,
    pub advisory: Family<ServiceLabels, Gauge>,
    pub decisions: Family<DecisionLabels, Counter>,
    /// Scale-ups (or, in advisory mode, recommendations) the fast path made.
    pub fast_scale_ups: Family<TargetLabels, Counter>,
    pub plan_imbalance: Family<ServiceLabels, FloatGauge>,
}

impl AutoscalerMetrics {
    fn register(&self, root: &mut Registry) {
        let f = root.sub_registry_with_prefix("tidal_forecast");
        f.register(
            "observed_rps",
            "Request rate measured now",
            self.observed_rps.clone(),
        );
        f.register(
            "predicted_rps",
            "Point forecast of the request rate at the horizon",
            self.predicted_rps.clone(),
        );
        f.register(
            "lower_rps",
            "Lower end of the prediction interval",
            self.lower_rps.clone(),
        );
        f.register(
            "upper_rps",
            "Upper end of the prediction interval (what is provisioned for)",
            self.upper_rps.clone(),
        );
        f.register(
            "horizon_seconds",
            "How far ahead the forecast looks",
            self.horizon_seconds.clone(),
        );
        f.register(
            "error_ratio",
            "|forecast made one horizon ago - actual| / actual",
            self.error_ratio.clone(),
        );
        f.register(
            "upper_exceeded_ratio",
            "Share of recent forecasts whose actual exceeded the upper bound (nominal: 1 - quantile)",
            self.upper_exceeded_ratio.clone(),
        );
        f.register(
            "band_coverage_ratio",
            "Share of recent forecasts whose actual fell inside the band (nominal: 2 * quantile - 1)",
            self.band_coverage_ratio.clone(),
        );
        f.register(
            "upper_level",
            "Residual quantile level the upper bound uses now (adaptive calibration; starts at the quantile)",
            self.upper_level.clone(),
        );
        let a = root.sub_registry_with_prefix("tidal_autoscaler");
        a.register(
            "desired_replicas",
            "Replicas the autoscaler decided",
            self.desired_replicas.clone(),
        );
        a.register(
            "current_replicas",
            "Ready replicas when the decision was made",
            self.current_replicas.clone(),
        );
        a.register(
            "max_replicas",
            "The replica bound of each target (maxReplicas, maxReplicasPerNode, ...)",
            self.max_replicas.clone(),
        );
        a.register(
            "metrics_available",
            "1 when the last snapshot was fresh, 0 while decisions are held",
            self.metrics_available.clone(),
        );
        a.register(
            "advisory",
            "1 when autoscaling.mode is Advisory: desired_replicas is recommended, not applied",
            self.advisory.clone(),
        );
        a.register(
            "decisions",
            "Autoscaler decisions by direction",
            self.decisions.clone(),
        );
        a.register(
            "fast_scale_ups",
            "Scale-ups the fast path made on a sustained worker backlog (recommended in advisory mode)",
            self.fast_scale_ups.clone(),
        );
        root.sub_registry_with_prefix("tidal_expert").register(
            "plan_imbalance",
            "max / mean predicted load per expert-shard replica of the current plan",
            self.plan_imbalance.clone(),
        );
    }
}

/// Every metric the operator exports.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<ControllerLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    /// API writes the controllers made (what "a reconcile with nothing to change writes
    /// nothing" is measured by).
    pub api_writes: Family<WriteLabels, Counter>,
    /// Applies not sent because the cached child already holds the desired state.
    pub applies_skipped: Family<ControllerLabels, Counter>,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
    pub autoscaler: AutoscalerMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        let autoscaler = AutoscalerMetrics::default();
        autoscaler.register(&mut root);
        let registry = root.sub_registry_with_prefix("tidal_operator");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration =
            Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            });
        let api_writes = Family::<WriteLabels, Counter>::default();
        let applies_skipped = Family::<ControllerLabels, Counter>::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by reason",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconciliation took",
            reconcile_duration.clone(),
        );
        registry.register(
            "api_writes",
            "Writes to the Kubernetes API, by kind",
            api_writes.clone(),
        );
        registry.register(
            "applies_skipped",
            "Server-side applies not sent: the cached child already matched",
            applies_skipped.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica is the leader",
            leader.clone(),
        );
        Metrics {
            registry: root,
            autoscaler,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            api_writes,
            applies_skipped,
            leader,
        }
    }
}

impl Metrics {
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn observe_reconcile(
        &self,
        controller: &'static str,
        took: Duration,
        error: Option<&'static str>,
    ) {
        let l = ControllerLabels { controller };
        self.reconciles.get_or_create(&l).inc();
        self.reconcile_duration
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        if let Some(reason) = error {
            self.reconcile_errors
                .get_or_create(&ErrorLabels { controller, reason })
                .inc();
        }
    }

    pub fn apply_skipped(&self, controller: &'static str) {
        self.applies_skipped
            .get_or_create(&ControllerLabels { controller })
            .inc();
    }

    pub fn write(&self, controller: &'static str, kind: &'static str) {
        self.api_writes
            .get_or_create(&WriteLabels { controller, kind })
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding to a String");
        out
    }
}
