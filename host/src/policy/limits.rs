//! The bounds every policy call runs within.

use std::time::Duration;

/// Deadlines and caps applied to every policy instance.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Deadline for `select` and `observe`, which run on the data plane per connection.
    pub select_deadline: Duration,
    /// Deadline for `configure`, `update` and `remove`, which run on the control plane.
    pub update_deadline: Duration,
    /// A service port's memory budget unless its policy or its Service says otherwise:
    /// the linear memory of the port's instance, all memories together.
    pub memory_bytes: usize,
    /// The most any policy or Service may raise a port's budget to.
    pub memory_ceiling_bytes: usize,
    /// How often the engine's epoch advances; deadlines are enforced to this resolution.
    pub epoch_tick: Duration,
    /// Log bytes an instance may write (log import, stdout, stderr) in one call; the rest
    /// is dropped and counted.
    pub log_bytes_per_call: usize,
    /// Longest single log message; longer ones are cut.
    pub log_message_bytes: usize,
    /// Core instances, memories and tables one component may create: a component made of
    /// many small modules must not multiply its budget (the bytes are capped across all
    /// its memories together, these cap the count).
    pub max_core_instances: usize,
    pub max_memories: usize,
    pub max_tables: usize,
    /// Elements one table may grow to.
    pub max_table_elements: usize,
    /// Host resources (WASI pollables, streams) one instance may hold at once.
    pub max_resources: usize,
    /// Random bytes one WASI `get-random-bytes` call may ask for.
    pub random_bytes_per_call: u64,
    /// The largest module accepted, before anything else is done with it.
    pub max_module_bytes: usize,
    /// How long compiling one module may take, and the memory the compiler may use
    /// (its data segment), when modules are compiled in a child process.
    pub compile_timeout: Duration,
    pub compile_memory_bytes: u64,
    /// How long a service follows its failure mode after its first `select` failure before
    /// its policy is tried again; doubles per consecutive failure, up to a minute.
    pub quarantine: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            select_deadline: Duration::from_millis(1),
            update_deadline: Duration::from_millis(100),
            memory_bytes: 16 << 20,
            memory_ceiling_bytes: 256 << 20,
            epoch_tick: Duration::from_micros(500),
            log_bytes_per_call: 64 << 10,
            log_message_bytes: 1 << 10,
            max_core_instances: 16,
            max_memories: 2,
            max_tables: 16,
            max_table_elements: 100_000,
            max_resources: 1_000,
            random_bytes_per_call: 4 << 10,
            max_module_bytes: 8 << 20,
            compile_timeout: Duration::from_secs(10),
            compile_memory_bytes: 256 << 20,
            quarantine: Duration::from_secs(1),
        }
    }
}

impl Limits {
    /// Deadlines for tools that ask "does this module work" (`weir policy check` and
    /// `test`): deadlines are wall-clock time, and a busy machine must not turn a
    /// descheduled call into a false failure. Loops still fail, later.
    pub fn relaxed() -> Self {
        Limits {
            select_deadline: Duration::from_millis(100),
            update_deadline: Duration::from_secs(1),
            ..Limits::default()
        }
    }

    /// The budget of a port whose policy or Service asks for `mib` (or nothing): within
    /// the ceiling.
    pub fn memory_budget(&self, mib: Option<u32>) -> usize {
        match mib {
            Some(mib) => ((mib as usize) << 20).min(self.memory_ceiling_bytes),
            None => self.memory_bytes,
        }
    }

    /// Epoch ticks for a deadline: one more than the deadline covers, since the first tick
    /// may come at any moment after the call starts.
    pub(crate) fn ticks(&self, deadline: Duration) -> u64 {
        let tick = self.epoch_tick.as_nanos().max(1);
        (deadline.as_nanos().div_ceil(tick) as u64).max(1) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_is_never_shorter_than_asked() {
        let limits = Limits::default();
        // 1 ms at 0.5 ms ticks: 2 full ticks plus the partial first one.
        assert_eq!(limits.ticks(Duration::from_millis(1)), 3);
        assert_eq!(limits.ticks(Duration::from_micros(1)), 2);
    }
}
