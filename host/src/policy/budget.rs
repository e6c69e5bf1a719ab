//! The resources one policy instance may hold, counted over the whole
//! instance rather than per memory or per table.
//!
//! A component can carry several core modules, each with its own linear
//! memories and tables, so a cap that looks at one memory at a time lets a
//! crafted component hold several times its budget. [`InstanceBudget`] is
//! the store's [`wasmtime::ResourceLimiter`]: it adds up the bytes of every
//! linear memory and the elements of every table the instance creates or
//! grows (wasmtime reports a creation as growth from zero), and bounds how
//! many core instances, memories and tables there may be at all.
//!
//! Going over a limit is an error, not a refused growth, so the guest traps
//! (or its instantiation fails) with a reason that names the limit; the
//! caller then discards the instance as after any other trap.
//!
//! It owns the numbers and the accounting; the policy runtime decides what
//! to do with an instance that went over.

use std::fmt;

/// Table elements all tables of one instance may hold together.
///
/// Tables hold function references for indirect calls, about one element
/// per function called through a pointer. Measured after `init`: nova-cells
/// holds 81, the adversary plugin 96, a one-line componentize-py 0.25.1
/// policy (CPython and its runtime) 5 760. This is 45 times the last, and
/// keeps a runaway `table.grow` to about 2 MiB of host memory.
pub const MAX_TABLE_ELEMENTS: usize = 1 << 18;

/// Core module instances per policy instance. nova-cells has 3 (the
/// program, the WASI adapter and the glue between them), the
/// componentize-py policy 14.
pub const MAX_CORE_INSTANCES: usize = 100;

/// Linear memories per policy instance, whatever their size.
pub const MAX_MEMORIES: usize = 8;

/// Tables per policy instance, whatever their size.
pub const MAX_TABLES: usize = 64;

/// What one instance has taken so far, and what it may take.
#[derive(Debug)]
pub struct InstanceBudget {
    memory_cap: usize,
    memory_bytes: usize,
    table_elements: usize,
    /// The growth last allowed, taken back if wasmtime then fails to grow.
    last_memory_growth: usize,
    last_table_growth: usize,
}

/// What an instance holds at one moment, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub memory_bytes: usize,
    pub table_elements: usize,
}

/// Which limit a growth would break, as the guest's trap reports it.
#[derive(Debug)]
enum Exceeded {
    Memory { cap: usize, total: usize },
    Tables { total: usize },
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exceeded::Memory { cap, total } => write!(
                f,
                "memory limit: the instance's linear memories would hold {} in all, \
                 over its cap of {} (`policy.memory_mib`, counted over all memories)",
                mib(*total),
                mib(*cap)
            ),
            Exceeded::Tables { total } => write!(
                f,
                "table limit: the instance's tables would hold {total} elements in all, \
                 over the cap of {MAX_TABLE_ELEMENTS}"
            ),
        }
    }
}

impl std::error::Error for Exceeded {}

impl InstanceBudget {
    /// A budget of `memory_cap` bytes of linear memory in all.
    pub fn new(memory_cap: usize) -> InstanceBudget {
        InstanceBudget {
            memory_cap,
            memory_bytes: 0,
            table_elements: 0,
            last_memory_growth: 0,
            last_table_growth: 0,
        }
    }

    /// What the instance holds now.
    pub fn usage(&self) -> Usage {
        Usage {
            memory_bytes: self.memory_bytes,
            table_elements: self.table_elements,
        }
    }
}

impl wasmtime::ResourceLimiter for InstanceBudget {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let growth = desired.saturating_sub(current);
        let total = self.memory_bytes.saturating_add(growth);
        if total > self.memory_cap {
            return Err(wasmtime::Error::new(Exceeded::Memory {
                cap: self.memory_cap,
                total,
            }));
        }
        self.memory_bytes = total;
        self.last_memory_growth = growth;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory_bytes = self.memory_bytes.saturating_sub(self.last_memory_growth);
        self.last_memory_growth = 0;
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let growth = desired.saturating_sub(current);
        let total = self.table_elements.saturating_add(growth);
        if total > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::new(Exceeded::Tables { total }));
        }
        self.table_elements = total;
        self.last_table_growth = growth;
        Ok(true)
    }

    fn table_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.table_elements = self.table_elements.saturating_sub(self.last_table_growth);
        self.last_table_growth = 0;
        Ok(())
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

/// A byte count as an operator reads it: "12 MiB", or "12.5 MiB".
pub fn mib(bytes: usize) -> String {
    let whole = bytes >> 20;
    let tenths = ((bytes & ((1 << 20) - 1)) * 10) >> 20;
    if tenths == 0 {
        format!("{whole} MiB")
    } else {
        format!("{whole}.{tenths} MiB")
    }
}

/// The limit `error` reports, when a growth went over one: the reason
/// without the wasm backtrace wasmtime wraps around it.
pub fn exceeded(error: &wasmtime::Error) -> Option<String> {
    error.downcast_ref::<Exceeded>().map(Exceeded::to_string)
}

/// The sandbox's own wording for wasmtime's refusal to create one more core
/// instance, memory or table, or `None` for any other error.
pub fn explain_count_limit(error: &wasmtime::Error) -> Option<String> {
    // wasmtime words this refusal itself ("resource limit exceeded: memory
    // count too high at 9"); a test pins the wording.
    let text = format!("{error:#}");
    let (what, cap) = if text.contains("instance count too high") {
        ("core instances", MAX_CORE_INSTANCES)
    } else if text.contains("memory count too high") {
        ("linear memories", MAX_MEMORIES)
    } else if text.contains("table count too high") {
        ("tables", MAX_TABLES)
    } else {
        return None;
    };
    Some(format!(
        "count limit: a policy instance may hold at most {cap} {what}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter as _;

    const MIB: usize = 1 << 20;

    #[test]
    fn memories_are_counted_together() {
        let mut budget = InstanceBudget::new(16 * MIB);
        assert!(budget.memory_growing(0, 12 * MIB, None).is_ok());
        let refused = budget
            .memory_growing(0, 12 * MIB, None)
            .expect_err("a second 12 MiB memory passes 16 MiB");
        let reason = refused.to_string();
        assert!(reason.starts_with("memory limit"), "{reason}");
        assert!(
            reason.contains("24 MiB") && reason.contains("16 MiB"),
            "{reason}"
        );
        assert!(budget.memory_growing(0, 4 * MIB, None).is_ok());
        assert_eq!(budget.usage().memory_bytes, 16 * MIB);
    }

    #[test]
    fn a_growth_that_failed_is_given_back() {
        let mut budget = InstanceBudget::new(16 * MIB);
        assert!(budget.memory_growing(MIB, 9 * MIB, None).is_ok());
        let _ = budget.memory_grow_failed(wasmtime::Error::msg("no room"));
        assert_eq!(budget.usage().memory_bytes, 0);
        assert!(budget.table_growing(0, 10, None).is_ok());
        let _ = budget.table_grow_failed(wasmtime::Error::msg("no room"));
        assert_eq!(budget.usage().table_elements, 0);
    }

    #[test]
    fn tables_are_counted_together() {
        let mut budget = InstanceBudget::new(16 * MIB);
        assert!(budget
            .table_growing(0, MAX_TABLE_ELEMENTS - 1, None)
            .is_ok());
        assert!(budget.table_growing(0, 1, None).is_ok());
        let refused = budget.table_growing(1, 2, None).expect_err("over");
        assert!(refused.to_string().starts_with("table limit"), "{refused}");
    }

    #[test]
    fn sizes_read_in_mib() {
        assert_eq!(mib(16 * MIB), "16 MiB");
        assert_eq!(mib(12 * MIB + MIB / 2), "12.5 MiB");
    }
}
