//! Parameters that exist only in some PostgreSQL major versions, as Patroni's parameter tables
//! (`patroni/postgresql/available_parameters/0_postgres.yml`, and `promote_trigger_file` from
//! its recovery parameters) record them: a configuration written for an older or newer major
//! version still starts, the parameters this one lacks dropped with a warning, where postgres
//! refuses to start on an unknown parameter. `wal_keep_segments`/`wal_keep_size` are renamed
//! instead (`conf::translate_for_version`).

use std::collections::BTreeMap;

/// `(name, first major version that has it, first major version that no longer has it)`,
/// versions as `server_version_num` (`150000`, `90600`); parameters every supported version
/// has are not listed.
const VERSIONED: &[(&str, u32, Option<u32>)] = &[
    ("allow_alter_system", 170000, None),
    ("allow_in_place_tablespaces", 100000, None),
    ("archive_library", 150000, None),
    ("autovacuum_analyze_score_weight", 190000, None),
    ("autovacuum_freeze_score_weight", 190000, None),
    ("autovacuum_max_parallel_workers", 190000, None),
    ("autovacuum_multixact_freeze_score_weight", 190000, None),
    ("autovacuum_vacuum_insert_scale_factor", 130000, None),
    ("autovacuum_vacuum_insert_score_weight", 190000, None),
    ("autovacuum_vacuum_insert_threshold", 130000, None),
    ("autovacuum_vacuum_max_threshold", 180000, None),
    ("autovacuum_vacuum_score_weight", 190000, None),
    ("autovacuum_work_mem", 90400, None),
    ("autovacuum_worker_slots", 180000, None),
    ("backend_flush_after", 90600, None),
    ("backtrace_functions", 130000, None),
    ("bgwriter_flush_after", 90600, None),
    ("checkpoint_flush_after", 90600, None),
    ("checkpoint_segments", 90300, Some(90500)),
    ("client_connection_check_interval", 140000, None),
    ("cluster_name", 90500, None),
    ("commit_timestamp_buffers", 170000, None),
    ("compute_query_id", 140000, None),
    ("createrole_self_grant", 160000, None),
    ("data_sync_retry", 90400, None),
    ("db_user_namespace", 90300, Some(170000)),
    ("debug_discard_caches", 150000, None),
    ("debug_io_direct", 160000, None),
    ("debug_logical_replication_streaming", 170000, None),
    ("debug_parallel_query", 160000, None),
    ("debug_print_raw_parse", 190000, None),
    ("default_table_access_method", 120000, None),
    ("default_toast_compression", 140000, None),
    ("default_with_oids", 90300, Some(120000)),
    ("dynamic_shared_memory_type", 90400, None),
    ("enable_async_append", 140000, None),
    ("enable_distinct_reordering", 180000, None),
    ("enable_eager_aggregate", 190000, None),
    ("enable_gathermerge", 100000, None),
    ("enable_group_by_reordering", 170000, None),
    ("enable_incremental_sort", 130000, None),
    ("enable_memoize", 150000, None),
    ("enable_parallel_append", 110000, None),
    ("enable_parallel_hash", 110000, None),
    ("enable_partition_pruning", 110000, None),
    ("enable_partitionwise_aggregate", 110000, None),
    ("enable_partitionwise_join", 110000, None),
    ("enable_presorted_aggregate", 160000, None),
    ("enable_self_join_elimination", 180000, None),
    ("escape_string_warning", 90300, Some(190000)),
    ("event_triggers", 170000, None),
    ("extension_control_path", 180000, None),
    ("extension_destdir", 140000, Some(180000)),
    ("file_copy_method", 180000, None),
    ("file_extend_method", 190000, None),
    ("force_parallel_mode", 90600, Some(160000)),
    ("gin_pending_list_limit", 90500, None),
    ("gss_accept_delegation", 160000, None),
    ("hash_mem_multiplier", 130000, None),
    ("hosts_file", 190000, None),
    ("huge_page_size", 140000, None),
    ("huge_pages", 90400, None),
    ("icu_validation_level", 160000, None),
    ("idle_in_transaction_session_timeout", 90600, None),
    ("idle_replication_slot_timeout", 180000, None),
    ("idle_session_timeout", 140000, None),
    ("ignore_invalid_pages", 130000, None),
    ("io_combine_limit", 170000, None),
    ("io_max_combine_limit", 180000, None),
    ("io_max_concurrency", 180000, None),
    ("io_max_workers", 190000, None),
    ("io_method", 180000, None),
    ("io_min_workers", 190000, None),
    ("io_worker_idle_timeout", 190000, None),
    ("io_worker_launch_interval", 190000, None),
    ("io_workers", 180000, Some(190000)),
    ("jit", 110000, None),
    ("jit_above_cost", 110000, None),
    ("jit_debugging_support", 110000, None),
    ("jit_dump_bitcode", 110000, None),
    ("jit_expressions", 110000, None),
    ("jit_inline_above_cost", 110000, None),
    ("jit_optimize_above_cost", 110000, None),
    ("jit_profiling_support", 110000, None),
    ("jit_provider", 110000, None),
    ("jit_tuple_deforming", 110000, None),
    ("krb_srvname", 90300, Some(90400)),
    ("log_autoanalyze_min_duration", 190000, None),
    ("log_lock_failures", 180000, None),
    ("log_min_duration_sample", 130000, None),
    ("log_parameter_max_length", 130000, None),
    ("log_parameter_max_length_on_error", 130000, None),
    ("log_recovery_conflict_waits", 140000, None),
    ("log_replication_commands", 90500, None),
    ("log_startup_progress_interval", 150000, None),
    ("log_statement_sample_rate", 130000, None),
    ("log_transaction_sample_rate", 120000, None),
    ("logical_decoding_work_mem", 130000, None),
    ("logical_replication_mode", 160000, Some(170000)),
    ("maintenance_io_concurrency", 130000, None),
    ("max_active_replication_origins", 180000, None),
    ("max_logical_replication_workers", 100000, None),
    ("max_notify_queue_pages", 170000, None),
    ("max_parallel_apply_workers_per_subscription", 160000, None),
    ("max_parallel_maintenance_workers", 110000, None),
    ("max_parallel_workers", 100000, None),
    ("max_parallel_workers_per_gather", 90600, None),
    ("max_pred_locks_per_page", 100000, None),
    ("max_pred_locks_per_relation", 100000, None),
    ("max_repack_replication_slots", 190000, None),
    ("max_replication_slots", 90400, None),
    ("max_slot_wal_keep_size", 130000, None),
    ("max_sync_workers_per_subscription", 100000, None),
    ("max_wal_size", 90500, None),
    ("max_worker_processes", 90400, None),
    ("md5_password_warnings", 180000, None),
    ("min_dynamic_shared_memory", 140000, None),
    ("min_eager_agg_group_size", 190000, None),
    ("min_parallel_index_scan_size", 100000, None),
    ("min_parallel_relation_size", 90600, Some(100000)),
    ("min_parallel_table_scan_size", 100000, None),
    ("min_wal_size", 90500, None),
    ("multixact_member_buffers", 170000, None),
    ("multixact_offset_buffers", 170000, None),
    ("notify_buffers", 170000, None),
    ("oauth_validator_libraries", 180000, None),
    ("old_snapshot_threshold", 90600, Some(170000)),
    ("operator_precedence_warning", 90500, Some(140000)),
    ("parallel_leader_participation", 110000, None),
    ("parallel_setup_cost", 90600, None),
    ("parallel_tuple_cost", 90600, None),
    ("password_expiration_warning_threshold", 190000, None),
    ("plan_cache_mode", 120000, None),
    ("promote_trigger_file", 120000, Some(160000)),
    ("recovery_init_sync_method", 140000, None),
    ("recovery_prefetch", 150000, None),
    ("recursive_worktable_factor", 150000, None),
    ("remove_temp_files_after_crash", 140000, None),
    ("replacement_sort_tuples", 90600, Some(110000)),
    ("reserved_connections", 160000, None),
    ("restrict_nonsystem_relation_kind", 120000, None),
    ("row_security", 90500, None),
    ("scram_iterations", 160000, None),
    ("send_abort_for_crash", 160000, None),
    ("send_abort_for_kill", 160000, None),
    ("serializable_buffers", 170000, None),
    ("session_preload_libraries", 90400, None),
    ("shared_memory_type", 120000, None),
    ("sql_inheritance", 90300, Some(100000)),
    ("ssl_crl_dir", 140000, None),
    ("ssl_dh_params_file", 100000, None),
    ("ssl_ecdh_curve", 90400, Some(180000)),
    ("ssl_groups", 180000, None),
    ("ssl_max_protocol_version", 120000, None),
    ("ssl_min_protocol_version", 120000, None),
    ("ssl_passphrase_command", 110000, None),
    ("ssl_passphrase_command_supports_reload", 110000, None),
    ("ssl_prefer_server_ciphers", 90400, None),
    ("ssl_renegotiation_limit", 90300, Some(90500)),
    ("ssl_sni", 190000, None),
    ("ssl_tls13_ciphers", 180000, None),
    ("stats_fetch_consistency", 150000, None),
    ("stats_temp_directory", 90300, Some(150000)),
    ("subtransaction_buffers", 170000, None),
    ("summarize_wal", 170000, None),
    ("sync_replication_slots", 170000, None),
    ("synchronized_standby_slots", 170000, None),
    ("syslog_sequence_numbers", 90600, None),
    ("syslog_split_messages", 90600, None),
    ("tcp_user_timeout", 120000, None),
    ("timing_clock_source", 190000, None),
    ("trace_connection_negotiation", 170000, None),
    ("trace_recovery_messages", 90300, Some(170000)),
    ("track_commit_timestamp", 90500, None),
    ("track_cost_delay_timing", 180000, None),
    ("track_wal_io_timing", 140000, None),
    ("transaction_buffers", 170000, None),
    ("transaction_timeout", 170000, None),
    ("vacuum_buffer_usage_limit", 160000, None),
    ("vacuum_cleanup_index_scale_factor", 110000, Some(140000)),
    ("vacuum_defer_cleanup_age", 90300, Some(160000)),
    ("vacuum_failsafe_age", 140000, None),
    ("vacuum_max_eager_freeze_failure_rate", 180000, None),
    ("vacuum_multixact_failsafe_age", 140000, None),
    ("vacuum_truncate", 180000, None),
    ("wal_compression", 90500, None),
    ("wal_consistency_checking", 100000, None),
    ("wal_decode_buffer_size", 150000, None),
    ("wal_init_zero", 120000, None),
    ("wal_log_hints", 90400, None),
    ("wal_receiver_create_temp_slot", 130000, None),
    ("wal_recycle", 120000, None),
    ("wal_retrieve_retry_interval", 90500, None),
    ("wal_sender_shutdown_timeout", 190000, None),
    ("wal_skip_threshold", 130000, None),
    ("wal_summary_keep_time", 170000, None),
    ("wal_writer_flush_after", 90600, None),
];

/// The PostgreSQL version a `server_version_num`-style major version names (`15`, `9.6`).
pub fn version_name(major: u32) -> String {
    if major >= 100_000 {
        (major / 10_000).to_string()
    } else {
        format!("{}.{}", major / 10_000, (major / 100) % 100)
    }
}

/// Why major version `major` lacks `name`, if it does.
pub fn unavailable(name: &str, major: u32) -> Option<String> {
    let (_, since, until) = VERSIONED.iter().find(|(n, _, _)| *n == name)?;
    if major < *since {
        Some(format!("added in PostgreSQL {}", version_name(*since)))
    } else if until.is_some_and(|u| major >= u) {
        Some(format!(
            "removed in PostgreSQL {}",
            version_name(until.unwrap_or_default())
        ))
    } else {
        None
    }
}

/// Removes the parameters major version `major` does not have; returns each with the reason.
pub fn drop_unavailable(
    params: &mut BTreeMap<String, String>,
    major: u32,
) -> Vec<(String, String)> {
    let gone: Vec<(String, String)> = params
        .keys()
        .filter_map(|name| unavailable(name, major).map(|why| (name.clone(), why)))
        .collect();
    for (name, _) in &gone {
        params.remove(name);
    }
    gone
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_another_major_version_lacks_are_dropped_with_the_reason() {
        let mut p: BTreeMap<String, String> = [
            ("stats_temp_directory", "/tmp"),
            ("vacuum_defer_cleanup_age", "0"),
            ("promote_trigger_file", "/tmp/t"),
            ("operator_precedence_warning", "off"),
            ("checkpoint_segments", "3"),
            ("allow_alter_system", "on"),
            ("archive_library", ""),
            ("work_mem", "4MB"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let gone = drop_unavailable(&mut p, 150_000);
        assert_eq!(
            gone,
            vec![
                (
                    "allow_alter_system".to_owned(),
                    "added in PostgreSQL 17".to_owned()
                ),
                (
                    "checkpoint_segments".to_owned(),
                    "removed in PostgreSQL 9.5".to_owned()
                ),
                (
                    "operator_precedence_warning".to_owned(),
                    "removed in PostgreSQL 14".to_owned()
                ),
                (
                    "stats_temp_directory".to_owned(),
                    "removed in PostgreSQL 15".to_owned()
                ),
            ]
        );
        // 15 still has these.
        for kept in [
            "vacuum_defer_cleanup_age",
            "promote_trigger_file",
            "archive_library",
            "work_mem",
        ] {
            assert!(p.contains_key(kept), "{kept}");
        }
        let gone = drop_unavailable(&mut p, 160_000);
        let names: Vec<&str> = gone.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["promote_trigger_file", "vacuum_defer_cleanup_age"]);
        assert_eq!(
            unavailable("archive_library", 130_000).as_deref(),
            Some("added in PostgreSQL 15")
        );
        assert_eq!(unavailable("work_mem", 90_300), None);
        assert_eq!(version_name(90_600), "9.6");
    }
}
