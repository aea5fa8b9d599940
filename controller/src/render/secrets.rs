//! Secrets with generated passwords. The controller only ever *creates* these (a create that
//! finds the Secret already there is fine): a password that exists is never replaced, because
//! the database already uses it and clients may have copied it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use rand::distr::{Alphanumeric, SampleString};

use super::agent_config::{REPLICATION_USER, RESTAPI_USER, SUPERUSER};
use super::{child_meta, Names};
use crate::crd::PostgresCluster;

/// Length of generated passwords: 32 alphanumeric characters, about 190 bits.
const PASSWORD_LEN: usize = 32;

/// Every Secret a cluster needs, each with a fresh password. Which of them are created is up
/// to the caller (only the missing ones).
pub fn secrets(pg: &PostgresCluster, mut password: impl FnMut() -> String) -> Vec<Secret> {
    let names = Names::of(pg);
    let mut out = vec![
        credentials(pg, names.superuser_secret(), SUPERUSER, password()),
        credentials(pg, names.replication_secret(), REPLICATION_USER, password()),
        credentials(pg, names.restapi_secret(), RESTAPI_USER, password()),
    ];
    for user in &pg.spec.users {
        out.push(credentials(
            pg,
            names.user_secret(&user.name),
            &user.name,
            password(),
        ));
    }
    out
}

/// A random password from the thread's CSPRNG.
pub fn generate_password() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), PASSWORD_LEN)
}

fn credentials(pg: &PostgresCluster, name: String, username: &str, password: String) -> Secret {
    Secret {
        metadata: child_meta(pg, name),
        type_: Some("kubernetes.io/basic-auth".to_owned()),
        string_data: Some(BTreeMap::from([
            ("username".to_owned(), username.to_owned()),
            ("password".to_owned(), password),
        ])),
        ..Secret::default()
    }
}
