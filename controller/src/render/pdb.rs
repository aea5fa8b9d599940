//! The PodDisruptionBudget: voluntary disruptions (node drains) take one member at a time.
//! `policy/v1beta1`, the version a 1.20 API server serves (`policy/v1` came with 1.21).

use k8s_openapi::api::policy::v1beta1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{child_meta, selector_labels, Names};
use crate::crd::PostgresCluster;

pub fn pdb(pg: &PostgresCluster) -> PodDisruptionBudget {
    let names = Names::of(pg);
    PodDisruptionBudget {
        metadata: child_meta(pg, names.statefulset()),
        spec: Some(PodDisruptionBudgetSpec {
            // A single-member cluster cannot keep a member through a drain; blocking the drain
            // forever would be worse than the (announced) downtime.
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&names)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}
