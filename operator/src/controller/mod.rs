//! Controllers: they read the cluster, call the pure builders, and write the result.

pub mod autoscale;
pub mod caches;
pub mod edge_node;
pub mod inference_service;
pub mod strip;
#[cfg(test)]
pub(crate) mod test_support;
pub(crate) mod written;

use std::sync::Arc;

use kube::Client;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};

use crate::children::BuildConfig;
use crate::metrics::Metrics;

/// Now, in whole seconds: metav1.Time serialises with second precision, so a computed status
/// compares equal to the stored one (and an unchanged reconcile writes nothing).
pub fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    use k8s_openapi::jiff::Timestamp;
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Timestamp::from_second(Timestamp::now().as_second()).expect("valid time"),
    )
}

/// What a kind needs to be watched and cached.
pub trait Cacheable:
    kube::Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Cacheable for K where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// A reflector on `api` whose store the reconciler reads and whose events trigger it: one
/// watch per kind feeds both. `strip` cuts each object down to what the reconciler reads
/// before it is cached (see [`strip`]).
pub(crate) fn cached<K>(
    api: kube::Api<K>,
    cfg: watcher::Config,
    strip: fn(&mut K),
) -> (
    Store<K>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Cacheable,
{
    let (store, writer) = reflector::store::<K>();
    let stream = reflector::reflector(writer, watcher(api, cfg).modify(strip))
        .default_backoff()
        .touched_objects();
    (store, stream)
}

/// Whether `store` has had its first full list (without waiting for it).
pub(crate) fn synced<K>(store: &Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    use futures::FutureExt;
    matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
}

/// What every controller shares.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub build: BuildConfig,
    pub metrics: Arc<Metrics>,
    /// Identity in Events (`reportingController` / `reportingInstance`).
    pub reporter: Reporter,
    /// Watch InferenceServices in this namespace only (all namespaces when `None`).
    pub namespace: Option<String>,
    /// Manage only the EdgeNodes this label selector matches (all when `None`).
    pub edge_node_selector: Option<String>,
    /// The autoscaler loop's settings.
    pub autoscale: autoscale::Settings,
    /// Concurrency and debounce of the controllers' reconcile queues.
    pub controller_config: kube::runtime::controller::Config,
}

impl Context {
    /// A namespaced API in the watched namespace, or across all namespaces.
    pub fn scoped_api<K>(&self) -> kube::Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        match &self.namespace {
            Some(ns) => kube::Api::namespaced(self.client.clone(), ns),
            None => kube::Api::all(self.client.clone()),
        }
    }

    pub fn new(
        client: Client,
        build: BuildConfig,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Arc<Self> {
        Arc::new(Context {
            client,
            build,
            metrics,
            reporter: Reporter {
                controller: "tidal-operator".into(),
                instance,
            },
            namespace: None,
            edge_node_selector: None,
            autoscale: autoscale::Settings::default(),
            controller_config: Default::default(),
        })
    }
}
