"""Connect to a Dask distributed cluster for a store (`vlinterpret stats` and `extract`, `--workers`/`--scheduler`).

While ``distributed_client`` is open its client is Dask's default scheduler, so every Dask
computation made inside (the head statistics' chunks, the hidden states read for projections
and for the search copies) runs on the cluster's workers, in processes; the results come back
to this process, which fits the projections and writes the caches beside the store. The values
are those of one process: the same tasks, computed elsewhere.

``workers=N`` starts a local cluster of N worker processes with one thread each (decoding
and the statistics' kernels take the GIL); ``scheduler=ADDRESS`` joins a running cluster, whose
workers must read the store's directory at the same path (checked before anything runs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from vlinterpret_panel.errors import VLIError

if TYPE_CHECKING:
    from distributed import Client


@contextmanager
def distributed_client(
    store: str | Path,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    timeout: float = 10.0,
) -> Iterator[Client | None]:
    """A Dask distributed client for the computations inside, or ``None`` (this process) without either option.

    ``VLIError`` when both or neither make sense: both options, fewer than one worker, an
    unreachable scheduler, or workers that cannot see ``store``.
    """
    if workers is None and scheduler is None:
        yield None
        return
    if workers is not None and scheduler is not None:
        raise VLIError("give --workers (a local cluster) or --scheduler (a running one), not both")
    if workers is not None and workers < 1:
        raise VLIError(f"--workers must be at least 1, got {workers}")
    from distributed import Client, LocalCluster

    with ExitStack() as stack:
        if scheduler is not None:
            try:
                client = stack.enter_context(Client(scheduler, timeout=f"{timeout}s"))
            except (OSError, TimeoutError) as error:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise VLIError(f"cannot reach the Dask scheduler at {scheduler!r}: {reason}") from None
        else:
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=workers,
                    processes=True,
                    threads_per_worker=1,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                )
            )
            client = stack.enter_context(Client(cluster))
        _check_workers_see(client, Path(store).resolve())
        yield client


def _check_workers_see(client: Client, store: Path) -> None:
    """``VLIError`` naming the workers that cannot read the store's directory at ``store``."""
    seen = client.run(os.path.isdir, str(store))
    if not seen:
        raise VLIError("the Dask cluster has no workers")
    blind = sorted(worker for worker, visible in seen.items() if not visible)
    if blind:
        raise VLIError(
            f"{len(blind)} of {len(seen)} Dask workers cannot see {store} ({', '.join(blind[:3])}): "
            "they must read the store's directory at the same path"
        )
