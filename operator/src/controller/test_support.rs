//! What the controllers' unit tests share: a mocked API server (tower-test) that records every
//! request, empty caches that have had their first list, and a Context on the mock.

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use tower_test::mock;

use super::Context;
use crate::children::BuildConfig;
use crate::metrics::Metrics;

/// One request the mock API server received.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: serde_json::Value,
}

pub type Calls = Arc<Mutex<Vec<Call>>>;

/// A client on a mock API server that answers each request with `reply(&call)` (a JSON body)
/// and records it.
pub fn mock_client(reply: impl Fn(&Call) -> serde_json::Value + Send + 'static) -> (Client, Calls) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let calls: Calls = Arc::default();
    let recorded = calls.clone();
    tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let call = Call {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or_default().to_string(),
                body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            };
            let out = serde_json::to_vec(&reply(&call)).unwrap();
            recorded.lock().unwrap().push(call);
            send.send_response(Response::builder().body(Body::from(out)).unwrap());
        }
    });
    (Client::new(service, "default"), calls)
}

/// A Context for tests on `client`.
pub fn context(client: Client) -> Arc<Context> {
    Context::new(
        client,
        BuildConfig::default(),
        Metrics::shared(),
        Some("test".into()),
    )
}

/// An empty cache that has had its first list.
pub fn synced_store<K>() -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    store_with(Vec::new())
}

/// A cache that has had its first list, holding `objects`.
pub fn store_with<K>(objects: Vec<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store::<K>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    std::mem::forget(writer); // a dropped writer would fail wait_until_ready
    store
}
