//! The watch caches the controllers and the autoscaler share: one watch and one store per kind
//! that more than one of them reads (InferenceServices, EdgeNodes, the services' Deployments),
//! instead of one per reader. Each reader that is also triggered by the kind subscribes to the
//! watch's objects; the store is shared as is.

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use super::{Cacheable, Context, cached, strip};
use crate::children::LABEL_SERVICE;
use crate::crd::{EdgeNode, InferenceService};

/// Objects a subscriber may fall behind the watch before the watch waits for it.
const BUFFER: usize = 1024;

/// A subscriber's stream: the watch's objects, as a controller's trigger.
pub type Objects<K> = std::pin::Pin<Box<dyn Stream<Item = Result<K, watcher::Error>> + Send>>;

/// One watch of a kind, its store, and the subscribers its objects go to.
pub struct Watched<K: Cacheable> {
    store: Store<K>,
    objects: Objects<K>,
    subscribers: Vec<mpsc::Sender<K>>,
}

impl<K: Cacheable> Watched<K> {
    fn new(api: kube::Api<K>, cfg: watcher::Config, strip: fn(&mut K)) -> Self {
        let (store, objects) = cached(api, cfg, strip);
        Watched {
            store,
            objects: Box::pin(objects),
            subscribers: Vec::new(),
        }
    }

    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// The store and a subscription: what a controller triggered by this kind takes.
    pub fn input(&mut self) -> (Store<K>, Objects<K>) {
        (self.store(), self.subscribe())
    }

    /// Every object the watch applies or deletes; subscribe before [`Shared::start`].
    pub fn subscribe(&mut self) -> Objects<K> {
        let (tx, rx) = mpsc::channel(BUFFER);
        self.subscribers.push(tx);
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|o| (Ok(o), rx))
        }))
    }

    fn start(self) -> JoinHandle<()> {
        let Watched {
            mut objects,
            subscribers,
            ..
        } = self;
        tokio::spawn(async move {
            while let Some(item) = objects.next().await {
                match item {
                    Ok(obj) => {
                        for s in &subscribers {
                            // A subscriber that stopped (its controller shut down) is skipped.
                            let _ = s.send(obj.clone()).await;
                        }
                    }
                    Err(e) => warn!(
                        kind = K::kind(&()).as_ref(),
                        error = %e,
                        "watch failed; retrying with backoff"
                    ),
                }
            }
        })
    }
}

/// The shared watches, until [`Shared::start`] runs them.
pub struct Shared {
    pub inference_services: Watched<InferenceService>,
    pub edge_nodes: Watched<EdgeNode>,
    /// Every service's Deployments (the InferenceService controller applies against them, the
    /// EdgeNode controller counts the edge ones, the autoscaler reads replicas).
    pub deployments: Watched<Deployment>,
}

impl Shared {
    pub fn new(ctx: &Context) -> Self {
        Shared {
            inference_services: Watched::new(
                ctx.scoped_api::<InferenceService>(),
                watcher::Config::default(),
                strip::managed_fields::<InferenceService>,
            ),
            edge_nodes: Watched::new(
                kube::Api::<EdgeNode>::all(ctx.client.clone()),
                match &ctx.edge_node_selector {
                    Some(s) => watcher::Config::default().labels(s),
                    None => watcher::Config::default(),
                },
                strip::managed_fields::<EdgeNode>,
            ),
            deployments: Watched::new(
                ctx.scoped_api::<Deployment>(),
                watcher::Config::default().labels(LABEL_SERVICE),
                strip::managed_fields::<Deployment>,
            ),
        }
    }

    /// Runs the watches until the returned guard is dropped.
    #[must_use = "dropping the guard stops the watches"]
    pub fn start(self) -> Running {
        Running(vec![
            self.inference_services.start(),
            self.edge_nodes.start(),
            self.deployments.start(),
        ])
    }
}

/// The running shared watches; dropping this stops them (also on an early return or a panic).
pub struct Running(Vec<JoinHandle<()>>);

impl Drop for Running {
    fn drop(&mut self) {
        for w in &self.0 {
            w.abort();
        }
    }
}
