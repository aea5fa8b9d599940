//! A custom method's section as Patroni reads it (`bootstrap.<name>`, `postgresql.<name>`): a
//! `command` split as a POSIX shell would, boolean switches, and every other key passed to the
//! command as `--key=value`. Shared by [`super::custom_bootstrap`] and
//! [`super::replica_method`]; errors name the field by its full path.

/// A field of a method's section that cannot be used, with its full path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{path}`: {reason}")]
pub struct MethodError {
    pub path: String,
    pub reason: String,
}

impl MethodError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> MethodError {
        MethodError {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// The mapping of one method, with the path it was read from (`bootstrap.clone`).
pub struct MethodSection<'a> {
    pub path: String,
    pub map: &'a serde_yaml::Mapping,
}

impl<'a> MethodSection<'a> {
    /// `value` at `path` as a section; `not_a_mapping` says what the section should be.
    pub fn new(
        path: String,
        value: &'a serde_yaml::Value,
        not_a_mapping: &str,
    ) -> Result<Self, MethodError> {
        match value.as_mapping() {
            Some(map) => Ok(MethodSection { path, map }),
            None => Err(MethodError::new(path, not_a_mapping)),
        }
    }

    /// The full path of `key` in this section.
    pub fn at(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    /// `command`, split into words as a POSIX shell would (Patroni's `shlex.split`).
    pub fn command(&self, missing: &str) -> Result<Vec<String>, MethodError> {
        match self.map.get("command") {
            Some(serde_yaml::Value::String(c)) => {
                shlex::split(c).filter(|w| !w.is_empty()).ok_or_else(|| {
                    MethodError::new(
                        self.at("command"),
                        "cannot be split into words as a shell would (unbalanced quotes?)",
                    )
                })
            }
            Some(_) => Err(MethodError::new(self.at("command"), "must be a string")),
            None => Err(MethodError::new(self.at("command"), missing)),
        }
    }

    /// A boolean switch in Patroni's spellings; absent or null is `false`.
    pub fn flag(&self, key: &str) -> Result<bool, MethodError> {
        match self.map.get(key) {
            None | Some(serde_yaml::Value::Null) => Ok(false),
            Some(v) => serde_json::to_value(v)
                .ok()
                .and_then(|v| crate::config::flex::parse_bool(&v))
                .ok_or_else(|| MethodError::new(self.at(key), "must be a boolean")),
        }
    }

    /// Every key but `reserved`, in the order written, with its value as the command gets it.
    pub fn params(&self, reserved: &[&str]) -> Result<Vec<(String, String)>, MethodError> {
        let mut params = Vec::new();
        for (k, v) in self.map {
            let Some(k) = k.as_str() else {
                return Err(MethodError::new(self.path.clone(), "keys must be strings"));
            };
            if reserved.contains(&k) {
                continue;
            }
            let value = scalar(v, true).ok_or_else(|| {
                MethodError::new(
                    self.at(k),
                    "must be a string, a number or a boolean: it is passed as --key=value",
                )
            })?;
            params.push((k.to_owned(), value));
        }
        Ok(params)
    }
}

/// A YAML scalar as text. `python_bools`: `True`/`False`, as Patroni formats a command
/// argument; otherwise `on`/`off` for postgres.
pub fn scalar(v: &serde_yaml::Value, python_bools: bool) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(
            match (python_bools, b) {
                (true, true) => "True",
                (true, false) => "False",
                (false, true) => "on",
                (false, false) => "off",
            }
            .to_owned(),
        ),
        _ => None,
    }
}
