"""Data-parallel training over MPI (mpi4py): one model replica per process, one
in-place ``Allreduce`` of the flat gradient buffer per step.

Every rank holds the same parameters (rank 0's, broadcast at construction) and
trains on its shard of each global batch. The gradient is that of the mean loss
over the global batch: each rank weights its local mean's gradient by its share
of the global count of loss terms (its valid rows) before the sum, so uneven
shards, empty shards and ``head="all"`` with lengths all give exactly what one
process gives on the concatenated batch, up to rounding.

Run under ``mpiexec -n N``. A failure inside a step on one rank (bad input, a
non-finite loss) is agreed on in the same collective that sums the counts, so
every rank raises instead of waiting for the failed one; an uncaught exception
elsewhere should abort the job: run scripts as ``mpiexec -n N python -m mpi4py
script.py`` (``fastlstm train --distributed`` does this itself).
"""
import json

import numpy as np

from . import _validate as check
from . import training
from .optim import clip_grad_norm

__all__ = ["DataParallel", "MPI"]

try:
    from mpi4py import MPI
except ImportError:  # pragma: no cover - exercised where mpi4py is absent
    raise ImportError("fastlstm.distributed needs mpi4py and an MPI: pip install "
                      "'fastlstm[mpi]' (mpi4py and the mpich wheel), or mpi4py built against "
                      "your cluster's MPI (Open MPI, Intel MPI, ...)") from None


class DataParallel:
    """Train a ``SequenceModel`` on many processes as one.

    Parameters
    ----------
    model : SequenceModel
        This rank's replica; its parameters and dropout generator are replaced by
        rank 0's. Every rank must build it with the same configuration.
    comm : mpi4py communicator, optional
        ``MPI.COMM_WORLD`` by default.

    Raises
    ------
    ValueError
        On every rank, when the ranks' models differ in configuration.
    """

    def __init__(self, model, comm=None):
        for attr in ("config", "flat_params", "flat_grads", "forward_backward", "lstm"):
            if not hasattr(model, attr):
                raise TypeError(f"model must be a SequenceModel, got {type(model).__name__}")
        if comm is not None and not isinstance(comm, MPI.Comm):
            raise TypeError(f"comm must be an mpi4py communicator (e.g. MPI.COMM_WORLD), got "
                            f"{type(comm).__name__}")
        self.model = model
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        mine = json.dumps(dict(model.config, seed=None), sort_keys=True)
        configs = self.comm.allgather(mine)
        differ = [r for r, c in enumerate(configs) if c != configs[0]]
        if differ:
            ours, theirs = json.loads(configs[0]), json.loads(configs[differ[0]])
            keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            raise ValueError(f"the models on ranks {differ} differ from rank 0's in "
                             + ", ".join(f"{k} ({theirs.get(k)!r} against {ours.get(k)!r})"
                                         for k in keys))
        self.comm.Bcast(model.flat_params, root=0)
        model.lstm.set_rng_state(self.comm.bcast(model.lstm.get_rng_state(), root=0))
        self._scalars = np.zeros(3)      # valid rows, their summed loss, failed ranks
        self.allreduce_seconds = 0.0     # summed over calls, for `fastlstm bench --distributed`

    # -- sharding ------------------------------------------------------------

    def agree(self, decision):
        """Rank 0's `decision` on every rank (a time limit read on one clock)."""
        return self.comm.bcast(decision, root=0)

    def step_global(self, x, y, opt, lengths=None, clip_norm=None):
        """``train_step`` on this rank's share of a global batch that every rank holds."""
        mine = self.part(np.arange(len(x)))
        return self.train_step(x[mine], y[mine], opt,
                               lengths=None if lengths is None else lengths[mine],
                               clip_norm=clip_norm)

    def part(self, indices):
        """This rank's contiguous share of `indices` (sizes differ by at most one;
        a share may be empty when there are fewer items than ranks)."""
        n = len(indices)
        lo = self.rank * n // self.size
        return indices[lo:(self.rank + 1) * n // self.size]

    # -- one step ------------------------------------------------------------

    def _rows(self, x, lengths):
        """Loss terms of this shard, up to a factor every rank shares."""
        N, T = x.shape[:2]
        if self.model.head == "last":
            return N
        return N * T if lengths is None else int(np.sum(lengths))

    def _agree(self, what, local):
        """Run local() -> (rows, summed loss); sum both and the failures over ranks.
        Every rank raises if any failed."""
        error = None
        try:
            rows, total = local()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the ranks agree
            error, rows, total = e, 0, 0.0
        self._scalars[:] = (rows, total, error is not None)
        self._timed(lambda: self.comm.Allreduce(MPI.IN_PLACE, self._scalars, op=MPI.SUM))
        rows, total, failed = self._scalars
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"{what} failed on {int(failed)} other rank(s) (see their "
                               "errors); nothing was changed here")
        if rows == 0:
            raise ValueError(f"{what}: the global batch is empty")
        return rows, total

    def _timed(self, fn):
        t0 = MPI.Wtime()
        fn()
        self.allreduce_seconds += MPI.Wtime() - t0

    def forward_backward(self, x, y, lengths=None, state=None):
        """Zero the gradients, run this rank's shard forward and backward, and sum:
        ``model.grads`` becomes the gradient of the mean loss over the global batch,
        the same on every rank. Returns (global mean loss, this shard's final state,
        None for an empty shard)."""
        return self._sum_gradients("forward_backward", x, y, lengths, state)

    def _check_everywhere(self, what, x, y, lengths, state):
        """Check this shard's arguments as the model would, and agree with the other
        ranks before anything is written: a refused step changes nothing on any rank."""
        error = None
        try:
            if isinstance(x, np.ndarray) and x.ndim == 3 and x.shape[0] == 0:   # an empty shard
                check.float_array("x", x, self.dtype)
                check.shape("x", x, ("B", "T", self.model.lstm.input_size))
            else:
                self.model.check_inputs(x, lengths, state)
            self.model.check_targets(y, x.shape[0], x.shape[1])
        except (TypeError, ValueError) as e:
            error = e
        self._scalars[:] = (0, 0, error is not None)
        self._timed(lambda: self.comm.Allreduce(MPI.IN_PLACE, self._scalars, op=MPI.SUM))
        if error is not None:
            raise error
        if self._scalars[2]:
            raise RuntimeError(f"{what} failed on {int(self._scalars[2])} other rank(s) (see "
                               "their errors); nothing was changed here")

    def _sum_gradients(self, what, x, y, lengths, state):
        m = self.model
        self._check_everywhere(what, x, y, lengths, state)
        m.zero_grad()
        final = [None]
        mine = [0]

        def local():
            if x.shape[0] == 0:
                return 0, 0.0
            loss, final[0] = m.forward_backward(x, y, lengths, state)
            mine[0] = self._rows(x, lengths)
            return mine[0], loss * mine[0]

        rows, total = self._agree(what, local)
        m.flat_grads *= m.dtype.type(mine[0] / rows)     # this shard's share of the mean
        self._timed(lambda: self.comm.Allreduce(MPI.IN_PLACE, m.flat_grads, op=MPI.SUM))
        return float(total / rows), final[0]

    def train_step(self, x, y, opt, lengths=None, clip_norm=None):
        """One step on the global batch whose shard on this rank is (x, y, lengths):
        the same update on every rank. Clipping uses the global norm. Returns the
        global mean loss."""
        if getattr(opt, "model", None) is not self.model:
            raise ValueError("opt was built for another model")
        if clip_norm is not None:
            clip_norm = check.real("clip_norm", clip_norm, lo=0.0, lo_open=True)
        loss, _ = self._sum_gradients("train_step", x, y, lengths, None)
        if not np.isfinite(loss):        # the same on every rank: no update from it
            return loss
        if clip_norm is not None:
            clip_grad_norm(self.model, clip_norm)   # every rank holds the summed gradient
        opt.step()
        return loss

    def evaluate(self, x, y, lengths=None):
        """The global mean loss (evaluation mode) over the shards (x, y, lengths)."""
        m = self.model

        def local():
            if x.shape[0] == 0:
                return 0, 0.0
            n = self._rows(x, lengths)
            return n, m.evaluate(x, y, lengths) * n

        rows, total = self._agree("evaluate", local)
        return float(total / rows)

    # -- what fit and checkpoints need --------------------------------------

    @property
    def flat_params(self):
        return self.model.flat_params

    @property
    def flat_grads(self):
        return self.model.flat_grads

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def head(self):
        return self.model.head

    @property
    def lstm(self):
        return self.model.lstm

    def zero_grad(self):
        self.model.zero_grad()

    def check_targets(self, y, N, T):
        self.model.check_targets(y, N, T)

    def fit(self, x, y, optimizer, epochs=10, batch_size=32, validation=None, shuffle=True,
            seed=0, progress=True, bptt=None, lengths=None, clip_norm=None, patience=None,
            max_seconds=None):
        """``SequenceModel.fit`` on all ranks: every rank passes the same arrays (a
        memory-mapped file serves), draws the same permutation from `seed`, and
        trains on its share of each global minibatch of `batch_size`. Validation is
        shared out too; every rank gets the same history; only rank 0 shows progress.
        `max_seconds` is read on rank 0's clock, so that all ranks stop after the
        same epoch."""
        batch_size = self._same_data(x, lengths, batch_size, epochs, seed)
        N = len(x)
        if bptt is not None and (batch_size < self.size or 0 < N % batch_size < self.size):
            raise ValueError(f"bptt under DataParallel needs every rank's share of every "
                             f"minibatch non-empty: batch_size={batch_size} and N={N} leave "
                             f"some of the {self.size} ranks without sequences")
        return training.fit(self, x, y, optimizer, epochs=epochs, batch_size=batch_size,
                            validation=validation, shuffle=shuffle, seed=seed,
                            progress=progress and self.rank == 0, bptt=bptt,
                            lengths=lengths, clip_norm=clip_norm, patience=patience,
                            max_seconds=max_seconds, part=self.part,
                            agree=self.agree)

    def _same_data(self, x, lengths, batch_size, epochs, seed):
        """Raise on every rank unless all ranks pass data of one shape and dtype and
        the same schedule: a rank with fewer sequences would pair its collectives
        with the wrong steps and leave the others waiting."""
        error = None
        try:
            batch_size = check.positive_int("batch_size", batch_size)
            check.float_array("x", x, self.dtype)
            mine = dict(shape=list(x.shape), dtype=str(x.dtype), lengths=lengths is not None,
                        batch_size=batch_size, epochs=epochs, seed=seed)
        except (TypeError, ValueError) as e:
            error, mine = e, dict(error=repr(e))
        everyone = self.comm.allgather(mine)
        if error is not None:
            raise error
        failed = [r for r, d in enumerate(everyone) if "error" in d]
        if failed:
            raise RuntimeError(f"fit failed on rank {failed[0]}: {everyone[failed[0]]['error']}")
        differ = [r for r, d in enumerate(everyone) if d != everyone[0]]
        if differ:
            theirs = everyone[differ[0]]
            what = ", ".join(f"{k} {theirs[k]!r} against {everyone[0][k]!r}"
                             for k in mine if theirs[k] != everyone[0][k])
            raise ValueError(f"fit needs the same data on every rank: rank {differ[0]} has "
                             f"{what} on rank 0")
        return batch_size

    def save(self, path, optimizer=None):
        """``SequenceModel.save`` from rank 0 only (atomic, as there); every rank
        returns once the file is complete."""
        error = None
        if self.rank == 0:
            try:
                self.model.save(path, optimizer)
            except Exception as e:  # noqa: BLE001 - shared with the other ranks below
                error = e
        failed = self.comm.bcast(None if error is None else repr(error), root=0)
        if error is not None:
            raise error
        if failed is not None:
            raise RuntimeError(f"saving {path} failed on rank 0: {failed}")
