//! Three Services: a headless one for stable member DNS names (and the StatefulSet's
//! `serviceName`), the primary Service selecting the Pod the leading agent labelled
//! `role=primary`, and the replicas Service selecting `role=replica`. The agents change their own
//! label within one HA cycle of a promotion or demotion, so the endpoints follow the leader
//! without the controller.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    child_meta, selector_labels, Names, API_PORT, POSTGRES_PORT, ROLE_LABEL, ROLE_PRIMARY,
    ROLE_REPLICA,
};
use crate::crd::{PostgresCluster, ServiceSpec as ServiceSettings};

pub fn headless(pg: &PostgresCluster) -> Service {
    let names = Names::of(pg);
    Service {
        metadata: child_meta(pg, names.headless_service()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            // Members must resolve each other before they are ready (a replica being cloned
            // is not ready yet).
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&names)),
            ports: Some(vec![
                port("postgresql", POSTGRES_PORT),
                port("api", API_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

pub fn primary(pg: &PostgresCluster) -> Service {
    let names = Names::of(pg);
    role_service(
        pg,
        names.primary_service(),
        ROLE_PRIMARY,
        &pg.spec.services.primary,
    )
}

pub fn replicas(pg: &PostgresCluster) -> Service {
    let names = Names::of(pg);
    role_service(
        pg,
        names.replicas_service(),
        ROLE_REPLICA,
        &pg.spec.services.replicas,
    )
}

fn role_service(
    pg: &PostgresCluster,
    name: String,
    role: &str,
    settings: &ServiceSettings,
) -> Service {
    let names = Names::of(pg);
    let mut selector = selector_labels(&names);
    selector.insert(ROLE_LABEL.to_owned(), role.to_owned());
    let mut metadata = child_meta(pg, name);
    if !settings.annotations.is_empty() {
        metadata.annotations = Some(settings.annotations.clone());
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(settings.kind.as_str().to_owned()),
            selector: Some(selector),
            ports: Some(vec![port("postgresql", POSTGRES_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn port(name: &str, number: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port: number,
        target_port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

/// Selector of the Service that sends clients to `role` Pods (used by tests and status).
pub fn role_selector(names: &Names, role: &str) -> BTreeMap<String, String> {
    let mut selector = selector_labels(names);
    selector.insert(ROLE_LABEL.to_owned(), role.to_owned());
    selector
}
