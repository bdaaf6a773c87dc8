"""A pool of POSIX shared-memory regions registered with a Triton server on the same host.

Sending a 3D volume through gRPC copies and serializes it twice; with system shared memory the
client writes it once into ``/dev/shm`` and the request carries only the region's name. Regions are
reused across requests (registration is an RPC) and re-registered after the server restarts, which
the backend signals by bumping :attr:`generation`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass, field

import tritonclient.utils.shared_memory as shm
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

_counter = itertools.count()


@dataclass
class Region:
    """One shared-memory region; ``registered_in`` is the pool generation it was registered in."""

    name: str
    byte_size: int
    handle: object = field(repr=False)
    registered_in: int = -1


class SharedMemoryPool:
    """Regions keyed by size, checked out one request at a time."""

    def __init__(self, client: InferenceServerClient) -> None:
        self._client = client
        self._free: list[Region] = []
        self._all: list[Region] = []
        self.generation = 0

    def invalidate(self) -> None:
        """The server may have restarted and forgotten every registration."""
        self.generation += 1

    async def acquire(self, byte_size: int, client_timeout: float | None) -> Region:
        """A registered region of at least ``byte_size`` bytes (power-of-two sizes, so they get reused)."""
        fitting = [r for r in self._free if r.byte_size >= byte_size]
        if fitting:
            region = min(fitting, key=lambda r: r.byte_size)
            self._free.remove(region)
        else:
            size = 1 << max(12, (byte_size - 1).bit_length())
            name = f"wlcad_{os.getpid()}_{next(_counter)}"
            region = Region(name, size, shm.create_shared_memory_region(name, "/" + name, size))
            self._all.append(region)
        try:
            await self._register(region, client_timeout)
        except BaseException:
            self._free.append(region)
            raise
        return region

    async def _register(self, region: Region, client_timeout: float | None) -> None:
        if region.registered_in == self.generation:
            return
        with contextlib.suppress(InferenceServerException):  # not registered (fresh server): fine
            await self._client.unregister_system_shared_memory(region.name, client_timeout=client_timeout)
        await self._client.register_system_shared_memory(
            region.name, "/" + region.name, region.byte_size, client_timeout=client_timeout
        )
        region.registered_in = self.generation

    def release(self, region: Region) -> None:
        self._free.append(region)

    async def close(self, client_timeout: float = 2.0) -> None:
        """Unregister (best effort: the server may be gone) and unlink every region."""
        for region in self._all:
            if region.registered_in >= 0:
                with contextlib.suppress(InferenceServerException):
                    await self._client.unregister_system_shared_memory(
                        region.name, client_timeout=client_timeout
                    )
            shm.destroy_shared_memory_region(region.handle)
        self._all.clear()
        self._free.clear()
