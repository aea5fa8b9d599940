//! Synchronous replication management (`synchronous_mode`), as a pure planner.
//!
//! Invariant (Patroni §5.7): a name is written to `sync` only after postgres has it in
//! `synchronous_standby_names` **and** reports it as `sync` in `pg_stat_replication`; removals go
//! to `sync` first, then to postgres. Only members listed in `sync` (and its `leader`) may race
//! for the lock, so every write acknowledged under synchronous commit exists on whoever can
//! become the next leader.

use std::collections::BTreeSet;

use super::decide::SyncRule;
use crate::dcs::{ClusterView, SyncState};
use crate::state::ReplicationRow;

/// Whether postgres running with `standby_names` acknowledges commits only through standbys
/// that `recorded` lists (or without waiting for any): then a `sync` key that already names us
/// as leader stays true once we open for writes. `*` matches any standby, so it never is; a
/// value we cannot read is not trusted either.
pub fn acknowledges_only_through_recorded(standby_names: &str, recorded: &SyncState) -> bool {
    parse_standby_names(standby_names).is_some_and(|names| {
        names
            .iter()
            .all(|n| !matches!(n, StandbyName::Star) && recorded.lists(n.as_str()))
    })
}

/// One entry of `synchronous_standby_names`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StandbyName {
    /// `*`: any standby.
    Star,
    /// An application name, unquoted.
    Name(String),
}

impl StandbyName {
    fn as_str(&self) -> &str {
        match self {
            StandbyName::Star => "*",
            StandbyName::Name(n) => n,
        }
    }

    /// Whether this entry names the standby `application_name` (postgres compares names
    /// case-insensitively).
    pub fn matches(&self, application_name: &str) -> bool {
        match self {
            StandbyName::Star => true,
            StandbyName::Name(n) => n.eq_ignore_ascii_case(application_name),
        }
    }
}

/// The standbys a `synchronous_standby_names` value lists, in every form postgres accepts:
/// `a, "b"`, `2 (a, b)`, `FIRST 2 (a, b)`, `ANY 1 (a, b)`. `None` when it cannot be read, so a
/// caller never mistakes a value it does not understand for an empty list.
pub fn parse_standby_names(value: &str) -> Option<Vec<StandbyName>> {
    parse_standby_setting(value).map(|s| s.names)
}

/// A `synchronous_standby_names` value, read as postgres does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbySetting {
    /// `ANY n (…)`: any `num` of the names acknowledge (quorum commit); otherwise the first
    /// `num` listed that are connected do.
    pub any: bool,
    /// How many standbys a commit waits for (a bare list waits for one; empty for none).
    pub num: u32,
    pub names: Vec<StandbyName>,
}

impl StandbySetting {
    /// The names, spelled by `spell` (`*` stays `*`).
    pub fn spelled(&self, spell: impl Fn(&str) -> String) -> BTreeSet<String> {
        self.names
            .iter()
            .map(|n| match n {
                StandbyName::Star => "*".to_owned(),
                StandbyName::Name(n) => spell(n),
            })
            .collect()
    }
}

/// [`parse_standby_names`] with the method and count.
pub fn parse_standby_setting(value: &str) -> Option<StandbySetting> {
    #[derive(Debug, PartialEq)]
    enum Token {
        Word(String),
        Quoted(String),
        Number(String),
        Star,
        Comma,
        Open,
        Close,
    }
    let mut tokens = Vec::new();
    let mut chars = value.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            ',' | '(' | ')' | '*' => {
                chars.next();
                tokens.push(match c {
                    ',' => Token::Comma,
                    '(' => Token::Open,
                    ')' => Token::Close,
                    _ => Token::Star,
                });
            }
            '"' => {
                chars.next();
                let mut name = String::new();
                loop {
                    match chars.next()? {
                        '"' if chars.peek() == Some(&'"') => {
                            chars.next();
                            name.push('"');
                        }
                        '"' => break,
                        other => name.push(other),
                    }
                }
                tokens.push(Token::Quoted(name));
            }
            c if c.is_ascii_digit() => {
                let mut digits = String::new();
                while let Some(&d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(d);
                    chars.next();
                }
                tokens.push(Token::Number(digits));
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut word = String::new();
                while let Some(&w) = chars
                    .peek()
                    .filter(|w| w.is_alphanumeric() || **w == '_' || **w == '$')
                {
                    word.push(w);
                    chars.next();
                }
                tokens.push(Token::Word(word));
            }
            _ => return None,
        }
    }
    let keyword = |t: Option<&Token>| {
        matches!(t, Some(Token::Word(w)) if w.eq_ignore_ascii_case("first")
            || w.eq_ignore_ascii_case("any"))
    };
    // `[FIRST|ANY] num ( list )` or a bare list.
    let (any, num, list): (bool, Option<&str>, &[Token]) = match tokens.as_slice() {
        [Token::Number(n), Token::Open, inner @ .., Token::Close] => (false, Some(n), inner),
        [first, Token::Number(n), Token::Open, inner @ .., Token::Close]
            if keyword(Some(first)) =>
        {
            let any = matches!(first, Token::Word(w) if w.eq_ignore_ascii_case("any"));
            (any, Some(n), inner)
        }
        all => (false, None, all),
    };
    let mut names = Vec::new();
    for (i, token) in list.iter().enumerate() {
        if i % 2 == 1 {
            // Separators, and never a trailing one.
            if *token != Token::Comma || i + 1 == list.len() {
                return None;
            }
            continue;
        }
        names.push(match token {
            Token::Word(w) | Token::Quoted(w) => StandbyName::Name(w.clone()),
            Token::Star => StandbyName::Star,
            _ => return None,
        });
    }
    let num = match num {
        Some(n) => n.parse().ok()?,
        None => u32::from(!names.is_empty()),
    };
    Some(StandbySetting { any, num, names })
}

/// `synchronous_standby_names` for `names`, as Patroni renders it in synchronous mode:
/// sorted, quoted only where postgres needs it, and `N (a,b)` when there are several, so
/// postgres waits for all of them.
pub fn render_standby_names(names: &BTreeSet<String>) -> String {
    let quoted: Vec<String> = names.iter().map(|n| quote_standby_name(n)).collect();
    match quoted.len() {
        0 | 1 => quoted.concat(),
        n => format!("{n} ({})", quoted.join(",")),
    }
}

/// Quotes a standby name unless it is a plain identifier (and not a keyword of the syntax).
pub(crate) fn quote_standby_name(name: &str) -> String {
    let mut chars = name.chars();
    let plain = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        && !name.eq_ignore_ascii_case("first")
        && !name.eq_ignore_ascii_case("any");
    if plain {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Which of a standby's positions counts, as `synchronous_commit` decides what a commit waits
/// for (Patroni's choice): `remote_apply` → replayed, `remote_write` → written, else flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LsnKind {
    Write,
    #[default]
    Flush,
    Replay,
}

impl LsnKind {
    /// For the value of `synchronous_commit` (`None`: postgres' default, `on`).
    pub fn for_synchronous_commit(setting: Option<&str>) -> Self {
        match setting.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
            Some("remote_apply") => LsnKind::Replay,
            Some("remote_write") => LsnKind::Write,
            _ => LsnKind::Flush,
        }
    }

    pub(crate) fn of(self, row: &ReplicationRow) -> Option<u64> {
        match self {
            LsnKind::Write => row.write_lsn,
            LsnKind::Flush => row.flush_lsn,
            LsnKind::Replay => row.replay_lsn,
        }
    }
}

/// The cluster's synchronous settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncMode {
    pub enabled: bool,
    /// Never fall back to asynchronous commit: block writes when no standby is synchronous.
    pub strict: bool,
    /// `synchronous_node_count`: how many synchronous standbys the leader keeps (fewer when
    /// fewer are eligible; 0 is read as 1).
    pub node_count: u32,
    /// `maximum_lag_on_syncnode` when it is on (Patroni: a value above 0): a standby further
    /// behind than this many bytes is not kept or picked while a closer one is eligible.
    pub max_lag: Option<u64>,
    /// Which standby position counts for lag and for ranking.
    pub lsn: LsnKind,
}

impl Default for SyncMode {
    fn default() -> Self {
        SyncMode {
            enabled: false,
            strict: false,
            node_count: 1,
            max_lag: None,
            lsn: LsnKind::Flush,
        }
    }
}

impl SyncMode {
    /// Patroni's reading of `maximum_lag_on_syncnode`: 0 or less (default -1) is off.
    pub fn max_lag_from_config(maximum_lag_on_syncnode: i64) -> Option<u64> {
        u64::try_from(maximum_lag_on_syncnode)
            .ok()
            .filter(|lag| *lag > 0)
    }
}

/// What the leader must do this cycle, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPlan {
    /// Write `sync` before touching postgres (shrinking the set, or taking the key over).
    pub key_before: Option<SyncState>,
    /// The value of `synchronous_standby_names` postgres must run with.
    pub standby_names: String,
    /// Write `sync` after postgres confirmed the new standby.
    pub key_after: Option<SyncState>,
    /// Delete `sync` (synchronous mode was switched off).
    pub delete_key: bool,
}

fn state(me: &str, names: &BTreeSet<String>) -> SyncState {
    SyncState {
        leader: Some(me.to_owned()),
        sync_standby: (!names.is_empty())
            .then(|| names.iter().cloned().collect::<Vec<_>>().join(",")),
        quorum: 0,
    }
}

/// A streaming standby that may become synchronous, with what ranks it.
struct Candidate<'a> {
    name: String,
    row: &'a ReplicationRow,
    nofailover: bool,
    priority: i64,
    /// Synchronous now (in postgres or in our `sync` key): kept over an equal newcomer, so
    /// `synchronous_standby_names` does not change whenever another standby is ahead.
    incumbent: bool,
    lsn: Option<u64>,
}

/// The standbys that may be synchronous for leader `me`, best first, with their `nofailover`
/// tag (Patroni's `_ReplicaList` and `current_state`): streaming members of `view` with a `sync_priority`
/// above 0 (`nosync` is 0), ranked by not `nofailover` (one that may not be promoted is a poor
/// guarantee), higher `sync_priority`, incumbency, then the further position. With `max_lag`,
/// a standby more than that behind the reference position is skipped, so the next one in
/// rank takes its place. The reference is the most advanced candidate when there are several
/// (when all of them are stuck none is swapped) and the leader's own position
/// (`leader_lsn`) when there is one.
fn eligible(
    mode: SyncMode,
    me: &str,
    view: &ClusterView,
    replication: &[ReplicationRow],
    current: &BTreeSet<String>,
    leader_lsn: Option<u64>,
) -> Vec<(String, bool)> {
    let mut candidates: Vec<Candidate> = Vec::new();
    for row in replication.iter().filter(|r| r.state == "streaming") {
        let Some(member) = view
            .members
            .iter()
            .find(|m| m.name.eq_ignore_ascii_case(&row.application_name))
        else {
            continue;
        };
        let priority = member.record.sync_priority();
        if member.name == me || priority <= 0 || candidates.iter().any(|c| c.name == member.name) {
            continue;
        }
        // One that should cascade from another standby (`replicatefrom`) is connected to us
        // only for the moment: it is no candidate (Patroni's `_should_cascade`).
        let replicatefrom = member
            .record
            .tags
            .get("replicatefrom")
            .and_then(|v| v.as_str());
        if replicatefrom.is_some()
            && super::decide::topology::upstream_of(view, me, &member.name, replicatefrom) != me
        {
            continue;
        }
        candidates.push(Candidate {
            name: member.name.clone(),
            row,
            nofailover: member.record.nofailover(),
            priority,
            incumbent: matches!(row.sync_state.as_str(), "sync" | "quorum")
                || current.contains(&member.name),
            lsn: mode.lsn.of(row),
        });
    }
    candidates.sort_by(|a, b| {
        a.nofailover
            .cmp(&b.nofailover)
            .then(b.priority.cmp(&a.priority))
            .then(b.incumbent.cmp(&a.incumbent))
            .then(b.lsn.cmp(&a.lsn))
            .then(a.name.cmp(&b.name))
    });
    let reference = if candidates.len() > 1 {
        candidates.iter().filter_map(|c| c.lsn).max()
    } else {
        leader_lsn
    };
    let within_lag = |c: &Candidate| match (mode.max_lag, reference) {
        (None, _) => true,
        (Some(max), Some(reference)) => c
            .lsn
            .is_some_and(|lsn| reference.saturating_sub(lsn) <= max),
        // Nothing to measure against: lag cannot be judged, so it does not disqualify.
        (Some(_), None) => true,
    };
    candidates
        .iter()
        .filter(|c| {
            let ok = within_lag(c);
            if !ok {
                tracing::debug!(
                    standby = %c.name,
                    state = %c.row.sync_state,
                    "behind by more than maximum_lag_on_syncnode: not a synchronous standby"
                );
            }
            ok
        })
        .map(|c| (c.name.clone(), c.nofailover))
        .collect()
}

fn wanted(mode: SyncMode) -> usize {
    usize::try_from(mode.node_count.max(1)).unwrap_or(usize::MAX)
}

/// The standbys leader `me` should have as synchronous, best first (see [`eligible`]).
fn pick(
    mode: SyncMode,
    me: &str,
    view: &ClusterView,
    replication: &[ReplicationRow],
    current: &BTreeSet<String>,
    leader_lsn: Option<u64>,
) -> BTreeSet<String> {
    eligible(mode, me, view, replication, current, leader_lsn)
        .into_iter()
        .take(wanted(mode))
        .map(|(name, _)| name)
        .collect()
}

/// With quorum commit, the standbys that may vote and acknowledge (Patroni's `active`): every
/// eligible one, but those tagged `nofailover` only while fewer than `synchronous_node_count`
/// are chosen (a vote of a member that may not be promoted helps nobody take over).
pub fn quorum_active(
    mode: SyncMode,
    me: &str,
    view: &ClusterView,
    replication: &[ReplicationRow],
    current: &BTreeSet<String>,
    leader_lsn: Option<u64>,
) -> BTreeSet<String> {
    let mut active = BTreeSet::new();
    for (name, nofailover) in eligible(mode, me, view, replication, current, leader_lsn) {
        if !nofailover || active.len() < wanted(mode) {
            active.insert(name);
        }
    }
    active
}

/// Plans one cycle of synchronous replication management for leader `me`.
///
/// `replication` is the leader's `pg_stat_replication`; `leader_lsn` its current WAL
/// position. Members' tags (`sync_priority`, `nosync`, `nofailover`) come from `view`.
pub fn plan(
    mode: SyncMode,
    me: &str,
    view: &ClusterView,
    replication: &[ReplicationRow],
    leader_lsn: Option<u64>,
) -> SyncPlan {
    plan_with_readiness(mode, me, view, replication, leader_lsn, None)
}

/// [`plan`], where a standby not yet in `sync` is recorded only once it is in `caught_up`
/// (`quorum::Readiness`: it reached the leader's position of the moment it was listed), as
/// Patroni does; `None` trusts postgres' `sync` state alone.
pub fn plan_with_readiness(
    mode: SyncMode,
    me: &str,
    view: &ClusterView,
    replication: &[ReplicationRow],
    leader_lsn: Option<u64>,
    caught_up: Option<&BTreeSet<String>>,
) -> SyncPlan {
    if !mode.enabled {
        return SyncPlan {
            key_before: None,
            standby_names: String::new(),
            key_after: None,
            delete_key: view.sync.is_some(),
        };
    }
    let recorded = view.sync.as_ref().map(|s| &s.value);
    let ours = recorded.is_some_and(|s| s.leader.as_deref() == Some(me));
    let current: BTreeSet<String> = if ours {
        recorded
            .map(|s| s.standbys().into_iter().collect())
            .unwrap_or_default()
    } else {
        BTreeSet::new()
    };
    let desired = pick(mode, me, view, replication, &current, leader_lsn);
    // Postgres waits for every name listed (`N (…)` with N = all of them), so each one it
    // reports as `sync` holds every acknowledged write once the new value is in force.
    let confirmed: BTreeSet<String> = replication
        .iter()
        .filter(|r| r.state == "streaming" && r.sync_state == "sync")
        .filter_map(|r| {
            desired
                .iter()
                .find(|n| n.eq_ignore_ascii_case(&r.application_name))
        })
        .filter(|n| current.contains(*n) || caught_up.is_none_or(|c| c.contains(*n)))
        .cloned()
        .collect();
    let after_before: BTreeSet<String> = current.intersection(&desired).cloned().collect();
    let key_before = (!ours || after_before != current).then(|| state(me, &after_before));
    let key_after = (confirmed != after_before).then(|| state(me, &confirmed));
    let standby_names = if desired.is_empty() {
        if mode.strict {
            "*".to_owned()
        } else {
            String::new()
        }
    } else {
        render_standby_names(&desired)
    };
    SyncPlan {
        key_before,
        standby_names,
        key_after,
        delete_key: false,
    }
}

/// May `me` race for the lock under synchronous mode? Only the `sync` leader and its listed
/// standbys may. Without a `sync` key nobody knows who has every acknowledged write (the key
/// may have been lost with the DCS's state, not just be unwritten yet): no standby may, and
/// the cluster waits for its former primary (`decide` lets a former primary race) or an
/// operator, as Patroni does.
/// With quorum commit any member may race while `sync` exists: the votes decide
/// (`crate::ha::decide`).
pub fn may_race(rule: SyncRule, me: &str, view: &ClusterView) -> bool {
    match rule {
        SyncRule::Off => return true,
        SyncRule::Quorum => return view.sync.is_some(),
        SyncRule::Listed => {}
    }
    view.sync.as_ref().is_some_and(|s| s.value.names(me))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::{Member, MemberRecord, Versioned};

    #[test]
    fn only_listed_names_keep_a_sync_key_true() {
        let recorded = SyncState {
            leader: Some("a".into()),
            sync_standby: Some("b,c".into()),
            quorum: 0,
        };
        assert!(acknowledges_only_through_recorded("", &recorded));
        assert!(acknowledges_only_through_recorded("\"b\"", &recorded));
        assert!(acknowledges_only_through_recorded("b", &recorded));
        assert!(acknowledges_only_through_recorded("2 (b,c)", &recorded));
        assert!(!acknowledges_only_through_recorded("*", &recorded));
        assert!(!acknowledges_only_through_recorded("2 (b,*)", &recorded));
        assert!(!acknowledges_only_through_recorded(
            "\"b\",\"d\"",
            &recorded
        ));
        assert!(!acknowledges_only_through_recorded("2 (b,d)", &recorded));
        assert!(
            !acknowledges_only_through_recorded("2 (b,", &recorded),
            "an unreadable value is not trusted"
        );
    }

    #[test]
    fn standby_names_are_read_in_every_form_postgres_accepts() {
        let names = |s: &str| {
            parse_standby_names(s)
                .map(|v| v.iter().map(|n| n.as_str().to_owned()).collect::<Vec<_>>())
        };
        assert_eq!(names(""), Some(vec![]));
        assert_eq!(names(" a , \"b c\" "), Some(vec!["a".into(), "b c".into()]));
        assert_eq!(names("2 (a,b)"), Some(vec!["a".into(), "b".into()]));
        assert_eq!(names("FIRST 2 (a, b)"), Some(vec!["a".into(), "b".into()]));
        assert_eq!(names("any 1 (\"x\"\"y\")"), Some(vec!["x\"y".into()]));
        assert_eq!(names("first"), Some(vec!["first".into()]));
        assert_eq!(names("*"), Some(vec!["*".into()]));
        assert_eq!(names("a,"), None);
        assert_eq!(names("a b"), None);
        assert_eq!(names("\"open"), None);
        assert_eq!(names("2 (,)"), None);
    }

    #[test]
    fn several_standbys_are_rendered_as_patroni_does() {
        let set = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect();
        assert_eq!(render_standby_names(&set(&[])), "");
        assert_eq!(render_standby_names(&set(&["pg1"])), "pg1");
        assert_eq!(render_standby_names(&set(&["pg2", "pg1"])), "2 (pg1,pg2)");
        assert_eq!(
            render_standby_names(&set(&["pg-1", "first", "a\"b"])),
            "3 (\"a\"\"b\",\"first\",\"pg-1\")"
        );
        // What is rendered reads back as the same names.
        let back = parse_standby_names("3 (\"a\"\"b\",\"first\",\"pg-1\")").expect("parses");
        assert_eq!(back.len(), 3);
        assert!(back[0].matches("a\"b") && back[2].matches("PG-1"));
    }

    /// Members `a` (the leader), `b`, `c`, `d`, with `tags` per member.
    fn view_tagged(sync: Option<SyncState>, tags: &[(&str, serde_json::Value)]) -> ClusterView {
        ClusterView {
            members: ["a", "b", "c", "d"]
                .iter()
                .map(|n| {
                    let mut record = MemberRecord::default();
                    for (member, t) in tags {
                        if member == n {
                            record.tags = t.as_object().cloned().unwrap_or_default();
                        }
                    }
                    Member {
                        name: (*n).into(),
                        record,
                        revision: 1,
                        lease: 1,
                    }
                })
                .collect(),
            sync: sync.map(|value| Versioned { value, revision: 1 }),
            ..Default::default()
        }
    }

    fn view(sync: Option<SyncState>) -> ClusterView {
        view_tagged(sync, &[])
    }

    fn row(app: &str, sync_state: &str) -> ReplicationRow {
        lsn_row(app, sync_state, 1000)
    }

    fn lsn_row(app: &str, sync_state: &str, lsn: u64) -> ReplicationRow {
        ReplicationRow {
            usename: "replicator".into(),
            application_name: app.into(),
            client_addr: None,
            state: "streaming".into(),
            sync_state: sync_state.into(),
            sync_priority: 0,
            write_lsn: Some(lsn),
            flush_lsn: Some(lsn),
            replay_lsn: Some(lsn),
        }
    }

    const ON: SyncMode = SyncMode {
        enabled: true,
        strict: false,
        node_count: 1,
        max_lag: None,
        lsn: LsnKind::Flush,
    };

    fn standbys(state: Option<SyncState>) -> Option<String> {
        state.and_then(|s| s.sync_standby)
    }

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn new_standby_is_published_only_after_postgres_confirms_it() {
        let v = view(Some(state("a", &BTreeSet::new())));
        let p = plan(ON, "a", &v, &[row("b", "async")], Some(1000));
        assert_eq!(p.standby_names, "b");
        assert_eq!(p.key_after, None, "not yet confirmed by postgres");
        let p = plan(ON, "a", &v, &[row("b", "sync")], Some(1000));
        assert_eq!(standbys(p.key_after), Some("b".to_owned()));
    }

    #[test]
    fn a_member_that_should_cascade_is_no_candidate() {
        let mut v = view_tagged(
            Some(state("a", &BTreeSet::new())),
            &[("c", serde_json::json!({"replicatefrom": "b"}))],
        );
        for m in &mut v.members {
            m.record.state = "running".into();
            m.record.conn_url = format!("postgres://{}:5432/postgres", m.name);
        }
        let p = plan(ON, "a", &v, &[row("c", "async")], Some(1000));
        assert_eq!(p.standby_names, "", "c should stream from b");
        let p = plan(
            ON,
            "a",
            &v,
            &[row("b", "async"), row("c", "async")],
            Some(1000),
        );
        assert_eq!(p.standby_names, "b");
        // With b gone, c streams from the leader and may be synchronous.
        v.members.retain(|m| m.name != "b");
        let p = plan(ON, "a", &v, &[row("c", "async")], Some(1000));
        assert_eq!(p.standby_names, "c");
    }

    #[test]
    fn a_new_standby_is_published_only_once_it_caught_up() {
        let v = view(Some(state("a", &BTreeSet::new())));
        let rows = [row("b", "sync")];
        let p = plan_with_readiness(ON, "a", &v, &rows, Some(1000), Some(&names(&[])));
        assert_eq!(
            p.key_after, None,
            "postgres says sync, but it may lack older commits"
        );
        let p = plan_with_readiness(ON, "a", &v, &rows, Some(1000), Some(&names(&["b"])));
        assert_eq!(standbys(p.key_after), Some("b".to_owned()));
        // One already recorded stays without being checked again.
        let v = view(Some(state("a", &names(&["b"]))));
        let p = plan_with_readiness(ON, "a", &v, &rows, Some(1000), Some(&names(&[])));
        assert_eq!((p.key_before, p.key_after), (None, None));
    }

    #[test]
    fn a_standby_that_stopped_streaming_leaves_the_key_before_postgres() {
        let v = view(Some(state("a", &names(&["b"]))));
        let p = plan(ON, "a", &v, &[row("c", "async")], Some(1000));
        assert_eq!(
            p.key_before.map(|s| s.sync_standby),
            Some(None),
            "b removed from sync first"
        );
        assert_eq!(p.standby_names, "c");
    }

    #[test]
    fn a_new_leader_takes_the_key_over_without_naming_unconfirmed_standbys() {
        let v = view(Some(state("a", &names(&["b"]))));
        let p = plan(ON, "b", &v, &[row("c", "async")], Some(1000));
        assert_eq!(
            p.key_before,
            Some(SyncState {
                leader: Some("b".into()),
                sync_standby: None,
                quorum: 0
            })
        );
    }

    #[test]
    fn strict_mode_blocks_writes_without_a_standby_and_nosync_is_skipped() {
        let v = view_tagged(None, &[("b", serde_json::json!({"nosync": true}))]);
        let strict = SyncMode { strict: true, ..ON };
        let p = plan(strict, "a", &v, &[row("b", "async")], Some(1000));
        assert_eq!(p.standby_names, "*");
        let p = plan(ON, "a", &v, &[], Some(1000));
        assert_eq!(p.standby_names, "");
    }

    #[test]
    fn switching_sync_mode_off_deletes_the_key() {
        let v = view(Some(state("a", &BTreeSet::new())));
        let p = plan(SyncMode::default(), "a", &v, &[], Some(1000));
        assert!(p.delete_key);
        assert_eq!(p.standby_names, "");
    }

    #[test]
    fn node_count_two_keeps_two_standbys_in_priority_order() {
        let v = view_tagged(
            Some(state("a", &BTreeSet::new())),
            &[
                ("c", serde_json::json!({"sync_priority": 3})),
                ("d", serde_json::json!({"sync_priority": "2"})),
            ],
        );
        let two = SyncMode {
            node_count: 2,
            ..ON
        };
        let rows = [row("b", "async"), row("c", "async"), row("d", "async")];
        let p = plan(two, "a", &v, &rows, Some(1000));
        assert_eq!(p.standby_names, "2 (c,d)", "c (3) and d (2) before b (1)");
        assert_eq!(p.key_after, None, "neither confirmed yet");
        // Postgres now waits for both: each is published, in one comma-joined list.
        let rows = [row("b", "async"), row("c", "sync"), row("d", "sync")];
        let p = plan(two, "a", &v, &rows, Some(1000));
        assert_eq!(standbys(p.key_after), Some("c,d".to_owned()));
        // Only one confirmed so far: only that one is published.
        let rows = [row("b", "async"), row("c", "sync"), row("d", "async")];
        let p = plan(two, "a", &v, &rows, Some(1000));
        assert_eq!(standbys(p.key_after), Some("c".to_owned()));
        // More than there are eligible standbys: as many as there are.
        let five = SyncMode {
            node_count: 5,
            ..ON
        };
        let p = plan(five, "a", &v, &rows, Some(1000));
        assert_eq!(p.standby_names, "3 (b,c,d)");
    }

    #[test]
    fn sync_priority_zero_is_never_picked() {
        let v = view_tagged(
            Some(state("a", &BTreeSet::new())),
            &[
                ("b", serde_json::json!({"sync_priority": 0})),
                (
                    "c",
                    serde_json::json!({"nosync": "true", "sync_priority": 5}),
                ),
            ],
        );
        let two = SyncMode {
            node_count: 2,
            ..ON
        };
        let rows = [row("b", "async"), row("c", "async"), row("d", "async")];
        let p = plan(two, "a", &v, &rows, Some(1000));
        assert_eq!(
            p.standby_names, "d",
            "b (0) and c (nosync wins) are never synchronous"
        );
        let p = plan(two, "a", &v, &rows[..2], Some(1000));
        assert_eq!(p.standby_names, "");
    }

    #[test]
    fn a_higher_sync_priority_wins_even_over_the_current_standby() {
        let v = view_tagged(
            Some(state("a", &names(&["b"]))),
            &[("c", serde_json::json!({"sync_priority": 2}))],
        );
        let rows = [row("b", "sync"), row("c", "async")];
        let p = plan(ON, "a", &v, &rows, Some(1000));
        assert_eq!(p.standby_names, "c");
        assert_eq!(
            p.key_before.map(|s| s.sync_standby),
            Some(None),
            "b leaves `sync` before postgres stops waiting for it"
        );
        // At equal priority the current one is kept, even when the other is ahead.
        let v = view(Some(state("a", &names(&["b"]))));
        let rows = [lsn_row("b", "sync", 900), lsn_row("c", "async", 1000)];
        let p = plan(ON, "a", &v, &rows, Some(1000));
        assert_eq!(p.standby_names, "b");
        assert_eq!(p.key_before, None);
        assert_eq!(p.key_after, None);
    }

    #[test]
    fn a_standby_that_may_not_fail_over_is_picked_last() {
        let v = view_tagged(
            Some(state("a", &BTreeSet::new())),
            &[(
                "b",
                serde_json::json!({"nofailover": true, "sync_priority": 9}),
            )],
        );
        let rows = [row("b", "async"), row("c", "async")];
        assert_eq!(plan(ON, "a", &v, &rows, Some(1000)).standby_names, "c");
        assert_eq!(plan(ON, "a", &v, &rows[..1], Some(1000)).standby_names, "b");
    }

    #[test]
    fn a_lagging_synchronous_standby_is_replaced_only_with_maximum_lag_on_syncnode() {
        let v = view(Some(state("a", &names(&["b"]))));
        let rows = [lsn_row("b", "sync", 1_000), lsn_row("c", "async", 50_000)];
        // -1 (off): the current standby is kept however far behind.
        let off = SyncMode {
            max_lag: SyncMode::max_lag_from_config(-1),
            ..ON
        };
        let p = plan(off, "a", &v, &rows, Some(60_000));
        assert_eq!(p.standby_names, "b");
        assert_eq!(p.key_before, None);
        // On: b is 49 000 bytes behind c, the most advanced candidate.
        let on = SyncMode {
            max_lag: SyncMode::max_lag_from_config(10_000),
            ..ON
        };
        let p = plan(on, "a", &v, &rows, Some(60_000));
        assert_eq!(p.standby_names, "c", "c takes b's place");
        assert_eq!(
            p.key_before.map(|s| s.sync_standby),
            Some(None),
            "b leaves `sync` before postgres stops waiting for it"
        );
        assert_eq!(
            p.key_after, None,
            "c is published once postgres confirms it"
        );
        // Within the bound: kept.
        let rows = [lsn_row("b", "sync", 45_000), lsn_row("c", "async", 50_000)];
        assert_eq!(plan(on, "a", &v, &rows, Some(60_000)).standby_names, "b");
        // Alone, it is measured against the leader's position, and has no replacement.
        let p = plan(on, "a", &v, &[lsn_row("b", "sync", 1_000)], Some(60_000));
        assert_eq!(p.standby_names, "");
        assert_eq!(p.key_before.map(|s| s.sync_standby), Some(None));
        let p = plan(on, "a", &v, &[lsn_row("b", "sync", 55_000)], Some(60_000));
        assert_eq!(p.standby_names, "b");
        // The position that counts follows synchronous_commit.
        let mut lagging_replay = lsn_row("b", "sync", 1_000);
        lagging_replay.flush_lsn = Some(55_000);
        let p = plan(
            on,
            "a",
            &v,
            std::slice::from_ref(&lagging_replay),
            Some(60_000),
        );
        assert_eq!(p.standby_names, "b");
        let apply = SyncMode {
            lsn: LsnKind::for_synchronous_commit(Some("remote_apply")),
            ..on
        };
        let p = plan(apply, "a", &v, &[lagging_replay], Some(60_000));
        assert_eq!(p.standby_names, "");
    }

    #[test]
    fn max_lag_is_off_at_zero_or_below() {
        assert_eq!(SyncMode::max_lag_from_config(-1), None);
        assert_eq!(SyncMode::max_lag_from_config(0), None);
        assert_eq!(SyncMode::max_lag_from_config(1), Some(1));
    }

    #[test]
    fn only_sync_members_may_race() {
        let v = view(Some(state("a", &names(&["b"]))));
        assert!(may_race(SyncRule::Listed, "b", &v));
        assert!(may_race(SyncRule::Listed, "a", &v));
        assert!(!may_race(SyncRule::Listed, "c", &v));
        assert!(may_race(SyncRule::Off, "c", &v));
        let both = view(Some(state("a", &names(&["b", "c"]))));
        assert!(may_race(SyncRule::Listed, "b", &both) && may_race(SyncRule::Listed, "c", &both));
        assert!(!may_race(SyncRule::Listed, "d", &both));
        // A lost (or not yet written) `sync` key names nobody.
        let lost = view(None);
        assert!(!may_race(SyncRule::Listed, "b", &lost));
        assert!(may_race(SyncRule::Off, "b", &lost));
    }
}
