//! Patroni's key layout (`patroni-compat.md` §1.1, §1.3): every key is `<base>/<name>`, where
//! `<base>` is `/<namespace>/<scope>` with runs of `/` collapsed.

/// Builds the base path from namespace and scope.
pub fn base_path(namespace: &str, scope: &str) -> String {
    let joined = format!("/{namespace}/{scope}");
    let mut out = String::with_capacity(joined.len());
    for c in joined.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out.trim_end_matches('/').to_owned()
}

/// The keys of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    base: String,
}

/// What a key under the base path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind<'a> {
    Initialize,
    Config,
    Leader,
    Status,
    LegacyOptime,
    Failover,
    Sync,
    History,
    Failsafe,
    Member(&'a str),
    /// Anything else (deeper member paths, MPP groups): ignored, as Patroni does.
    Other,
}

impl Keys {
    pub fn new(namespace: &str, scope: &str) -> Self {
        Keys {
            base: base_path(namespace, scope),
        }
    }

    /// `<base>/`: the prefix of every key of the cluster.
    pub fn prefix(&self) -> String {
        format!("{}/", self.base)
    }

    pub fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.base)
    }

    pub fn initialize(&self) -> String {
        self.key("initialize")
    }
    pub fn config(&self) -> String {
        self.key("config")
    }
    pub fn leader(&self) -> String {
        self.key("leader")
    }
    pub fn status(&self) -> String {
        self.key("status")
    }
    pub fn failover(&self) -> String {
        self.key("failover")
    }
    pub fn sync(&self) -> String {
        self.key("sync")
    }
    pub fn history(&self) -> String {
        self.key("history")
    }
    pub fn member(&self, name: &str) -> String {
        self.key(&format!("members/{name}"))
    }

    /// Classifies a full key read under [`Keys::prefix`].
    pub fn classify<'a>(&self, key: &'a str) -> KeyKind<'a> {
        let Some(suffix) = key
            .strip_prefix(self.base.as_str())
            .and_then(|k| k.strip_prefix('/'))
        else {
            return KeyKind::Other;
        };
        match suffix {
            "initialize" => KeyKind::Initialize,
            "config" => KeyKind::Config,
            "leader" => KeyKind::Leader,
            "status" => KeyKind::Status,
            "optime/leader" => KeyKind::LegacyOptime,
            "failover" => KeyKind::Failover,
            "sync" => KeyKind::Sync,
            "history" => KeyKind::History,
            "failsafe" => KeyKind::Failsafe,
            other => match other.strip_prefix("members/") {
                Some(name) if !name.is_empty() && !name.contains('/') => KeyKind::Member(name),
                _ => KeyKind::Other,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_path_collapses_slashes_like_patroni() {
        assert_eq!(base_path("/service/", "batman"), "/service/batman");
        assert_eq!(base_path("service", "batman"), "/service/batman");
        assert_eq!(base_path("//a//", "b"), "/a/b");
    }

    #[test]
    fn classify_member_keys_only_one_level_deep() {
        let k = Keys::new("/service/", "batman");
        assert_eq!(k.classify("/service/batman/leader"), KeyKind::Leader);
        assert_eq!(
            k.classify("/service/batman/members/pg0"),
            KeyKind::Member("pg0")
        );
        assert_eq!(k.classify("/service/batman/members/pg0/x"), KeyKind::Other);
        assert_eq!(k.classify("/service/batmanx/leader"), KeyKind::Other);
        assert_eq!(
            k.classify("/service/batman/optime/leader"),
            KeyKind::LegacyOptime
        );
    }
}
