//! The last stage of a tick: the planned writes, in order — status first (the InferenceService
//! controller applies the same numbers from it), then the scale subresources, then Events.

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource, ResourceExt};
use tracing::{info, warn};

use super::AUTOSCALER_MANAGER;
use super::plan::{Note, ScaleWrite, target_label};
use crate::controller::Context;
use crate::crd::InferenceService;
use crate::error::Result;

/// Merge-patches the status (the patch from `plan::status_patch`).
pub async fn status(
    ctx: &Context,
    tis: &InferenceService,
    patch: &serde_json::Value,
) -> Result<()> {
    let api: Api<InferenceService> =
        Api::namespaced(ctx.client.clone(), &tis.namespace().unwrap_or_default());
    api.patch_status(
        &tis.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await?;
    ctx.metrics.write("autoscaler", "status");
    Ok(())
}

/// Writes replicas through each Deployment's scale subresource (field manager
/// `tidal-autoscaler`, so the controller's server-side apply never fights it).
pub async fn scales(ctx: &Context, tis: &InferenceService, writes: &[ScaleWrite]) -> Result<()> {
    let api: Api<Deployment> =
        Api::namespaced(ctx.client.clone(), &tis.namespace().unwrap_or_default());
    let pp = PatchParams {
        field_manager: Some(AUTOSCALER_MANAGER.into()),
        ..Default::default()
    };
    for w in writes {
        let patch = serde_json::json!({ "spec": { "replicas": w.to } });
        api.patch_scale(&w.deployment, &pp, &Patch::Merge(&patch))
            .await?;
        ctx.metrics.write("autoscaler", "scale");
        info!(
            service = %tis.name_any(), deployment = %w.deployment, target = %target_label(&w.kind),
            from = w.from, to = w.to, reason = %w.reason, "autoscaled"
        );
    }
    Ok(())
}

/// Publishes Events; a failed publish is logged, never fails the tick.
///
/// Each through a recorder of its own: kube's `Recorder` folds an Event alike in (type,
/// reason, action, object) to one published in the last 6 minutes into a series that keeps
/// the first note, and every note here is a distinct decision ("cloud 2 -> 3" must not show
/// as a second "cloud 1 -> 2").
pub async fn events(ctx: &Context, tis: &InferenceService, notes: &[Note]) {
    for n in notes {
        let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
        let event = Event {
            type_: if n.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: n.reason.into(),
            note: Some(n.note.clone()),
            action: n.action.clone(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &tis.object_ref(&())).await {
            warn!(error = %e, "failed to publish event");
        }
        ctx.metrics.write("autoscaler", "event");
    }
}

#[cfg(test)]
mod tests {
    //! The writes against a mocked API server (tower-test): which requests, with what.

    use super::*;
    use crate::children::ChildKind;
    use crate::controller::test_support::{context, mock_client};

    fn service() -> InferenceService {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "tidal.rs/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "m", "namespace": "prod", "uid": "u1", "generation": 2},
            "spec": {"model": {"uri": "/m", "architecture": "llama"},
                     "cloud": {"minReplicas": 1, "maxReplicas": 4}}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn status_then_scale_subresources_then_events() {
        let tis = service();
        let echo = serde_json::to_value(&tis).unwrap();
        let (client, calls) = mock_client(move |call| {
            if call.path.ends_with("/scale") {
                serde_json::json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                    "metadata": {"name": "m-cloud", "namespace": "prod"}, "spec": call.body["spec"]})
            } else if call.path.ends_with("/status") {
                echo.clone()
            } else {
                call.body.clone()
            }
        });
        let ctx = context(client.clone());
        let patch = serde_json::json!({"status": {"autoscaledReplicas": {"m-cloud": 3}}});
        let writes = [ScaleWrite {
            deployment: "m-cloud".into(),
            kind: ChildKind::Cloud,
            from: 1,
            to: 3,
            reason: "forecast 2.4 rps".into(),
        }];
        let notes = [Note {
            warning: false,
            reason: "Autoscaled",
            action: "ScaleUp".into(),
            note: "cloud 1 -> 3: forecast 2.4 rps".into(),
        }];
        status(&ctx, &tis, &patch).await.unwrap();
        scales(&ctx, &tis, &writes).await.unwrap();
        events(&ctx, &tis, &notes).await;
        // The next decision is an Event of its own with its own note, not a second count of
        // the first.
        let next = [Note {
            note: "cloud 3 -> 4: forecast 3.1 rps".into(),
            ..notes[0].clone()
        }];
        events(&ctx, &tis, &next).await;

        let calls = calls.lock().unwrap().clone();
        let got: Vec<(&str, &str)> = calls
            .iter()
            .map(|c| (c.method.as_str(), c.path.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "PATCH",
                    "/apis/tidal.rs/v1alpha1/namespaces/prod/inferenceservices/m/status"
                ),
                (
                    "PATCH",
                    "/apis/apps/v1/namespaces/prod/deployments/m-cloud/scale"
                ),
                ("POST", "/apis/events.k8s.io/v1/namespaces/prod/events"),
                ("POST", "/apis/events.k8s.io/v1/namespaces/prod/events"),
            ]
        );
        assert_eq!(calls[3].body["note"], "cloud 3 -> 4: forecast 3.1 rps");
        assert_eq!(calls[0].body, patch);
        assert_eq!(calls[1].body, serde_json::json!({"spec": {"replicas": 3}}));
        assert!(
            calls[1].query.contains("fieldManager=tidal-autoscaler"),
            "{}",
            calls[1].query
        );
        assert_eq!(calls[2].body["reason"], "Autoscaled");
        assert_eq!(calls[2].body["note"], "cloud 1 -> 3: forecast 2.4 rps");
        assert_eq!(calls[2].body["regarding"]["name"], "m");
    }

    #[tokio::test]
    async fn nothing_planned_writes_nothing() {
        let tis = service();
        let (client, calls) = mock_client(|call| call.body.clone());
        let ctx = context(client.clone());
        scales(&ctx, &tis, &[]).await.unwrap();
        events(&ctx, &tis, &[]).await;
        assert!(calls.lock().unwrap().is_empty());
    }
}
