"""KernelKeeping: a served kernel's keeper (kernels.persist_keeper), from the server's side.

The keeper (persist/keeper.py) holds the kernel's output and replies while no server is
attached. The server starts one once its kernel answered (again after each restart of the
kernel: a keeper ends with the process it was started for), attaches at once and keeps the
link; letting the kernel go, it DETACHes (the keeper takes over after the last message the
clients were given, and keeps the replies queued for offline clients); shutting the kernel
down, it stops the keeper. A keeper that cannot be started or reached is logged once, and
the kernel is served without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..kernel_driver.signing import Signer
from ..kernel_driver.tasks import BackgroundTasks
from ..kernel_driver.wire import join_frames
from ..persist import keeper_client
from ..persist.keeper_client import Backlog, KeeperError, KeeperLink, keeper_socket_path
from ..persist.keeper_protocol import for_client
from .mailbox import ClientMailbox

logger = logging.getLogger(__name__)


class KernelKeeping:
    def __init__(
        self,
        kernel_id: str,
        connection_file: str,
        identity: bytes,
        log_path: Path | None,
        on_change: Callable[[], None],
    ) -> None:
        self.kernel_id = kernel_id
        self.connection_file = connection_file
        self.identity = identity
        self.log_path = log_path
        self.on_change = on_change  # a keeper attached: worth recording
        self.socket = keeper_socket_path(kernel_id)
        self.link: KeeperLink | None = None
        self._kernel_pid: int | None = None  # the process the keeper serves
        self._tasks = BackgroundTasks(f"Kernel {kernel_id}'s keeper")

    @property
    def socket_path(self) -> str:
        """The keeper's socket while one serves the kernel, else ""."""
        return str(self.socket) if self.link is not None else ""

    def ensure(self, kernel_pid: int | None) -> None:
        """A keeper for the kernel's process `kernel_pid`, started in the background unless
        one serves it already."""
        if kernel_pid is None or kernel_pid == self._kernel_pid:
            return
        self._kernel_pid = kernel_pid
        self._drop_link()
        self._tasks.spawn(self._start(kernel_pid), "starting the keeper")

    async def _start(self, kernel_pid: int) -> None:
        try:
            if self.socket.exists() and await self._attach_running():
                return
            await keeper_client.start_keeper(
                Path(self.connection_file),
                self.socket,
                kernel_pid,
                self.identity,
                log_path=self.log_path,
            )
            # What it kept since its start, the server got live.
            link, _ = await keeper_client.attach(self.socket, identity=self.identity)
        except KeeperError as error:
            logger.warning("Kernel %s: no keeper: %s", self.kernel_id, error)
            return
        self._attached(link, kernel_pid)

    async def _attach_running(self) -> bool:
        """Attach to a keeper already serving the kernel (started by a server killed before
        it could record it); whether there was one."""
        kernel_pid = self._kernel_pid
        try:
            link, _ = await keeper_client.attach(self.socket, identity=self.identity)
        except KeeperError:
            return False
        self._attached(link, kernel_pid)
        return True

    def _attached(self, link: KeeperLink, kernel_pid: int | None) -> None:
        if self._kernel_pid != kernel_pid:
            link.close()  # the kernel restarted meanwhile: that keeper is ending
            return
        self.link = link
        logger.info("Kernel %s: its keeper serves it (%s)", self.kernel_id, self.socket)
        self.on_change()

    async def attach(self, socket: str) -> Backlog | None:
        """Attach to the keeper an earlier server left (taking a kernel back); its backlog,
        or None (logged) when it is gone or refuses."""
        try:
            link, backlog = await keeper_client.attach(Path(socket), identity=self.identity)
        except (KeeperError, OSError) as error:
            logger.warning(
                "Kernel %s: its keeper is gone or unreachable (%s): what the kernel said "
                "while no server was there is lost",
                self.kernel_id,
                error,
            )
            return None
        self.link = link
        return backlog

    def adopted(self, kernel_pid: int | None) -> None:
        """The keeper attached at take-back serves `kernel_pid` (no new one for it)."""
        self._kernel_pid = kernel_pid if self.link is not None else None

    async def detach(
        self,
        last_msg_id: str,
        unsent: list[str],
        queued: Sequence[tuple[str, Sequence[bytes]]] = (),
    ) -> bool:
        """The server lets the kernel go: the keeper keeps what follows `last_msg_id`, or
        from the oldest of `unsent`, and the `queued` messages of offline clients (see
        KeeperLink.detach). Whether it took them (False: none attached, or it failed)."""
        await self._tasks.cancel_all()
        link, self.link = self.link, None
        if link is None:
            return False
        try:
            await link.detach(last_msg_id, self.identity, unsent=unsent, queued=queued)
        except (KeeperError, OSError) as error:
            # The link is closed anyway: the keeper keeps everything from now on.
            logger.warning(
                "Kernel %s: the keeper did not take the detach: %s", self.kernel_id, error
            )
            return False
        return True

    async def shutdown(self) -> None:
        """The kernel is shut down: so is its keeper."""
        await self._tasks.cancel_all()
        self._drop_link()
        self._kernel_pid = None
        if not self.socket.exists():
            return
        try:
            await keeper_client.shutdown(self.socket)
        except (KeeperError, OSError) as error:
            logger.info("Kernel %s: the keeper was already gone: %s", self.kernel_id, error)

    def _drop_link(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.close()


def queued_replies(
    mailboxes: Iterable[ClientMailbox], signer: Signer
) -> list[tuple[str, list[bytes]]]:
    """What the mailboxes still hold on shell/control/stdin (replies, input requests of
    clients offline at a stop), signed again with the kernel's key (a mailbox holds parsed
    parts: the signature is the one the kernel made) and tagged with the client's session_id
    for the keeper: (channel, frames)."""
    return [
        (
            message.channel,
            for_client(
                mailbox.session_id,
                [bytes(frame) for frame in join_frames(message.parts, message.buffers, signer)],
            ),
        )
        for mailbox in mailboxes
        for message in mailbox.unsent_replies()
    ]
