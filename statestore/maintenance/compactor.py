"""etcd compaction, safe with any number of service replicas.

The Kubernetes apiserver algorithm (``storage/etcd3/compact.go``): every
``interval`` each replica runs ONE txn on the shared key ``<root>/_compactor``:

    If(version(_compactor) == t) Then(put _compactor = rev) Else(get _compactor)

where ``t`` is the key's version this replica last saw and ``rev`` the store
revision it saw on its previous round. The winner of the CAS (exactly one per
round, since the put bumps the version) compacts etcd to ``rev``: a revision
at least one interval old, so watchers and readers had an interval to catch
up. Losers just learn the new version. With many replicas that is about one
compaction per interval in total, not one per replica; a replica that dies
changes nothing for the others. The first round only records (no compaction
on bootstrap).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from statestore.errors import InvalidArgument, StateStoreError
from statestore.etcd import Compacted, EtcdClient, Txn
from statestore.keys import RootLayout
from statestore.records import encode_compactor_revision

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CompactorState:
    #: Version of the shared key this replica last saw.
    version: int = 0
    #: Store revision seen on the previous round (the next compaction target).
    revision: int = 0
    compactions: int = 0
    last_compacted: int = 0


class Compactor:
    def __init__(self, client: EtcdClient, root: str, interval: float) -> None:
        if interval <= 0:
            raise InvalidArgument("compaction interval must be > 0 seconds")
        self._client = client
        self._key = RootLayout(root).compactor
        self.interval = interval
        self.state = CompactorState()
        self._stop = asyncio.Event()

    async def round(self) -> bool:
        """One round; True when this replica compacted."""
        st = self.state
        t = (
            Txn()
            .compare("version", self._key, "==", st.version)
            .then(Txn.put(self._key, encode_compactor_revision(st.revision)))
            .orelse(Txn.get(self._key))
        )
        res = await self._client.txn(t, what="compactor round")
        target, st.revision = st.revision, res.revision
        if not res.succeeded:
            kvs = res.results[0]
            st.version = kvs[0].version if kvs else 0
            return False
        st.version += 1
        if target == 0:
            return False  # bootstrap: nothing seen yet to compact to
        try:
            await self._client.compact(target)
        except Compacted:
            return False  # someone (an operator?) compacted further already
        st.compactions += 1
        st.last_compacted = target
        log.info("compacted etcd to revision %d", target)
        return True

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.round()
            except StateStoreError as e:
                log.warning("compaction round failed (will retry next interval): %s", e)
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()
