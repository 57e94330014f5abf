"""A layer's calls split by hidden units rather than by the batch (see _columns,
_columns_train): when a call takes that split, and its plans. ``lstm.LSTM`` takes these
methods from ``UnitsSplit``."""
import threading

import numpy as np

from ._plans import ColumnPlan, ColumnTrainPlan, Last
from ._shared import readonly
from ._threads import COLUMN_MIN_H, column_parts, train_column_parts

__all__ = ["UnitsSplit"]


class UnitsSplit:
    """For a model with ``_columns_ok`` (a layer of the kind the split runs), ``_spec``,
    ``flat_params``, ``_plans`` and ``_col_plans`` (``_plans.Plans``), ``_col_weights``
    and ``_weights_version`` (fastlstm.Inference's), ``_buf`` and ``_last``."""

    @property
    def _units_split(self):
        """Whether an evaluation forward may take the column split (then not the plans):
        a layer of its kind large enough for the rule, or bfloat16 weights."""
        return self._columns_ok and (self.hidden_size >= COLUMN_MIN_H
                                     or self._col_weights is not None)

    def _columns_forward(self, xt, h0, c0, lens, last_only):
        """An evaluation forward split by hidden units (_plans.ColumnPlan), or None where
        that does not pay or the servers are another thread's."""
        T, B = xt.shape[:2]
        bf16 = self._col_weights is not None
        n = column_parts(self.threads, B, self.hidden_size)  # bfloat16: 1 too
        if n < 2 and not bf16:
            return None
        plan = self._col_plans.get((T, B))
        if plan is None or plan.n != n:
            plan = self._col_plans.put((T, B), ColumnPlan(
                self._spec, self.flat_params, T, B, n, self._col_weights,
                kept=self._weights_version is not None))
        res = plan.forward(xt, h0, c0, lens, self._weights_version)
        if res is None:             # the servers are another thread's
            if not bf16:
                return None
            plan = ColumnPlan(self._spec, self.flat_params, T, B, 1, self._col_weights)
            res = plan.forward(xt, h0, c0, lens)
        y, state = res
        self._last = Last(T, B, plan.lengths, [None] * self.num_layers, {}, None, kept=False,
                          last_only=last_only)
        if last_only:
            y_last = self._buf.get("y_last", (B, self._P))
            np.copyto(y_last, plan.y[plan.lengths - 1, np.arange(B)])
            return readonly(y_last), state
        return (y.transpose(1, 0, 2) if self.batch_first else y), state

    def _train_columns(self, T, B):
        """Threads for a forward that keeps its activations, and its backward, split by
        hidden units (_plans.ColumnTrainPlan); 1: not that way."""
        if not self._columns_ok:
            return 1
        n = train_column_parts(self.threads, B, self.hidden_size, self.dtype.itemsize)
        return n if ColumnTrainPlan.fits(self._spec, n) else 1

    def _columns_train_forward(self, x, xt, h0, c0, masks):
        """x's forward through the ColumnTrainPlan of its shape (made on the first call):
        its result, or None when the servers are another thread's."""
        T, B = xt.shape[:2]
        n = self._train_columns(T, B)
        plan = self._plans.get(x.shape)
        if type(plan) is not ColumnTrainPlan or plan.n != n:
            plan = self._plans.put(x.shape, ColumnTrainPlan(self._spec, T, B, n))
        out = plan.forward(xt, h0, c0, masks)
        if out is not None:
            plan.thread, plan.kept = threading.get_ident(), True
            self._last = plan
        return out
