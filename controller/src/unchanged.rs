//! Whether an apply would change anything, so that it can be left out.
//!
//! A server-side apply that changes nothing should be a no-op, and for most kinds it is. For a
//! StatefulSet on a 1.20 apiserver it is not (kubernetes/kubernetes#95460): every apply writes
//! a new `resourceVersion` and `managedFields` time. The controller watches the StatefulSets it
//! owns, so each apply woke the cluster's next reconcile, which applied again: at 200 clusters
//! the apiserver never went idle. An apply is therefore skipped when the live object already
//! holds every value the controller would apply ([`contained_in`]), carries the hash of exactly
//! this desired object (so a field the controller stopped setting is still applied away), and
//! has not been edited since our last apply (its `generation` is the one our apply left).

use serde_json::Value;

/// Annotation carrying the hash of the object the controller last applied.
pub const APPLIED_HASH_ANNOTATION: &str = "pgwarden.io/applied-hash";

/// Adds [`APPLIED_HASH_ANNOTATION`] to the JSON body of an object about to be applied: the hash
/// of the body without it.
pub fn with_applied_hash(mut desired: Value) -> Value {
    if let Some(metadata) = desired.get_mut("metadata").and_then(Value::as_object_mut) {
        if let Some(annotations) = metadata
            .get_mut("annotations")
            .and_then(Value::as_object_mut)
        {
            annotations.remove(APPLIED_HASH_ANNOTATION);
            if annotations.is_empty() {
                metadata.remove("annotations");
            }
        }
    }
    // serde_json's maps are sorted, so the text (and its hash) is stable.
    let hash = crate::render::agent_config::content_hash(&desired.to_string());
    if let Some(metadata) = desired.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = metadata
            .entry("annotations")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(annotations) = annotations.as_object_mut() {
            annotations.insert(APPLIED_HASH_ANNOTATION.to_owned(), Value::String(hash));
        }
    }
    desired
}

/// Whether `live` already holds every value of `desired`: objects key by key (the server adds
/// defaults and status, which do not count), lists element by element with the same length, and
/// scalars equal. An absent value matches a desired `null` or empty object or list, which the
/// server leaves out. Anything else, a value the server normalised included, counts as a change:
/// the price of a wrong "changed" is one apply, of a wrong "unchanged" a missed update.
pub fn contained_in(desired: &Value, live: &Value) -> bool {
    first_difference(desired, live).is_none()
}

/// The JSON pointer of the first value of `desired` that `live` lacks ([`contained_in`]), for
/// the log of an apply that was not skipped.
pub fn first_difference(desired: &Value, live: &Value) -> Option<String> {
    match (desired, live) {
        (Value::Object(want), Value::Object(have)) => want.iter().find_map(|(key, value)| {
            let inner = match have.get(key) {
                None if is_empty(value) => None,
                None => Some(String::new()),
                Some(live) => first_difference(value, live),
            };
            inner.map(|path| format!("/{}{path}", key.replace('~', "~0").replace('/', "~1")))
        }),
        (Value::Array(want), Value::Array(have)) if want.len() == have.len() => want
            .iter()
            .zip(have)
            .enumerate()
            .find_map(|(i, (w, h))| first_difference(w, h).map(|path| format!("/{i}{path}"))),
        (want, Value::Null) if is_empty(want) => None,
        (want, have) if want == have => None,
        _ => Some(String::new()),
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.is_empty(),
        Value::Array(list) => list.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_defaults_and_status_do_not_count_as_a_change() {
        let desired = json!({
            "metadata": {"name": "a", "labels": {"app": "x"}},
            "spec": {"replicas": 3, "template": {"spec": {"containers": [
                {"name": "c", "image": "i", "env": [{"name": "A", "value": "1"}]}
            ]}}, "volumes": []},
        });
        let live = json!({
            "metadata": {"name": "a", "labels": {"app": "x"}, "resourceVersion": "7", "generation": 2},
            "spec": {"replicas": 3, "revisionHistoryLimit": 10, "template": {"spec": {
                "containers": [{"name": "c", "image": "i", "imagePullPolicy": "IfNotPresent",
                    "env": [{"name": "A", "value": "1"}]}],
                "restartPolicy": "Always",
            }}},
            "status": {"replicas": 3},
        });
        assert!(contained_in(&desired, &live));
    }

    #[test]
    fn a_changed_or_missing_value_or_list_element_is_a_change() {
        let desired = json!({"spec": {"replicas": 3, "ports": [{"port": 5432}], "flag": false}});
        for live in [
            json!({"spec": {"replicas": 2, "ports": [{"port": 5432}], "flag": false}}),
            json!({"spec": {"replicas": 3, "ports": [{"port": 5433}], "flag": false}}),
            json!({"spec": {"replicas": 3, "ports": [{"port": 5432}, {"port": 1}], "flag": false}}),
            json!({"spec": {"replicas": 3, "ports": [{"port": 5432}]}}),
            json!({"spec": {"ports": [{"port": 5432}], "flag": false}}),
        ] {
            assert!(!contained_in(&desired, &live), "{live}");
        }
        let live = json!({"spec": {"replicas": 3, "ports": [{"port": 5433}], "flag": false}});
        assert_eq!(
            first_difference(&desired, &live).as_deref(),
            Some("/spec/ports/0/port")
        );
    }

    #[test]
    fn the_hash_annotation_follows_every_field_and_not_itself() {
        let a = with_applied_hash(json!({"metadata": {"name": "a"}, "spec": {"x": 1}}));
        let b = with_applied_hash(json!({"metadata": {"name": "a"}, "spec": {"x": 2}}));
        let removed = with_applied_hash(json!({"metadata": {"name": "a"}, "spec": {}}));
        let hash = |v: &Value| v["metadata"]["annotations"][APPLIED_HASH_ANNOTATION].clone();
        assert!(hash(&a).is_string());
        assert_ne!(hash(&a), hash(&b));
        assert_ne!(hash(&a), hash(&removed));
        // Applying the hash again (to an object that already has one) gives the same hash.
        assert_eq!(with_applied_hash(a.clone()), a);
        // A live object applied from `a` does not hold `removed`'s hash, so it is applied.
        assert!(!contained_in(&removed, &a));
    }
}
