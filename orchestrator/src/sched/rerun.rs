//! `run --rerun`'s check on a stage executed again although its result was cached.

use super::RunLoop;
use crate::store::Manifest;

impl RunLoop<'_> {
    /// For a stage run again with `--rerun`, before its result replaces the cached one: when a
    /// deterministic stage gave other bytes on the same CPU and kernels, the warning that says
    /// so (that is nondeterminism, which `replay` would fail on).
    pub(super) fn rerun_differs(&self, i: usize, new: &Manifest) -> Option<String> {
        let st = &self.p.stages[i];
        if !self.opts.rerun.contains(&i) || !st.deterministic {
            return None;
        }
        let (_, old) = self.store.lookup(&new.key).ok()??;
        let same_kernels = old.provenance.as_ref().zip(new.provenance.as_ref()).is_some_and(|(a, b)| a.same_kernels(b));
        let differ: Vec<&str> = (old.outputs.iter())
            .filter(|(name, e)| !st.volatile_outputs.contains(name) && new.outputs.get(*name) != Some(*e))
            .map(|(name, _)| name.as_str())
            .collect();
        (same_kernels && !differ.is_empty()).then(|| {
            format!(
                "`{}` was run again and gave other bytes than its cached result ({}) on the same CPU and kernels: \
                 the stage is not deterministic (an unseeded RNG, the clock, the thread count?); the new result \
                 replaces the old; mark the stage `deterministic: false` if its output rightly varies",
                st.name,
                differ.iter().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(", ")
            )
        })
    }
}
