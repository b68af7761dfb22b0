"""The node's answer to every authenticated request: the transport's Handler, composed.

The transport (node/transport/server.py) authenticates the caller and decodes
the request, then calls one method here. This class only routes: delivery
requests to the delivery endpoints (app/serving.py), patient requests to the
patient endpoints (app/patients.py), descriptor requests to the contacts
service. It holds no state of its own.
"""

from __future__ import annotations

from typing import AsyncIterator

from ..core.errors import RemoteProtocolError
from ..core.identity import Descriptor, Identity
from ..transport.server import Answer
from .contacts import Contacts, OwnDescriptor
from .patients import PatientEndpoints
from .ports import Ports
from .serving import DeliveryEndpoints


class NodeHandler:
    def __init__(self, ports: Ports, own: OwnDescriptor, contacts: Contacts, delivery: DeliveryEndpoints,
                 patients: PatientEndpoints) -> None:
        self.ports, self.own, self.contacts = ports, own, contacts
        self.delivery, self.patients = delivery, patients

    @property
    def identity(self) -> Identity:
        return self.ports.identity

    def descriptor_bytes(self) -> bytes:
        return self.own.current.signed

    async def pinned_key(self, node_id: str) -> tuple[bytes | None, str | None]:
        return await self.contacts.pinned_key(node_id)

    async def receive_descriptor(self, caller: str, raw: bytes) -> Answer:
        """A contact hands us its new descriptor (rotated key, new address, revocation)."""
        desc = Descriptor.from_wire(raw)
        if desc.node_id != caller:
            raise RemoteProtocolError("a node may only hand over its own descriptor")
        _, status = await self.contacts.learn(desc)
        return Answer(200, {"status": status})

    # --- delivery ---------------------------------------------------------------------

    async def record_status(self, caller: str, record_id: str) -> Answer:
        return await self.delivery.record_status(caller, record_id)

    async def receive_record(self, caller: str, record_id: str, head_raw: bytes, offset: int, seq: int | None,
                             body: AsyncIterator[bytes]) -> Answer:
        return await self.delivery.receive_record(caller, record_id, head_raw, offset, seq, body)

    async def receive_batch(self, caller: str, items: list[tuple[int | None, bytes, bytes]]) -> Answer:
        return await self.delivery.receive_batch(caller, items)

    async def outbox_for(self, caller: str, since: int, limit: int, after: int = 0) -> Answer:
        return await self.delivery.outbox_for(caller, since, limit, after)

    async def body_for(self, caller: str, record_id: str, offset: int) -> tuple[int, AsyncIterator[bytes]]:
        return await self.delivery.body_for(caller, record_id, offset)

    async def receive_ack(self, caller: str, ack: dict) -> Answer:
        return await self.delivery.receive_ack(caller, ack)

    async def receive_receipts(self, caller: str, receipts: list[bytes]) -> Answer:
        return await self.delivery.receive_receipts(caller, receipts)

    # --- patients -----------------------------------------------------------------------

    async def access_request(self, caller: str, msg: dict) -> Answer:
        return await self.patients.access_request(caller, msg)

    async def patient_history(self, caller: str, msg: dict) -> Answer:
        return await self.patients.patient_history(caller, msg)

    async def patient_revocation(self, caller: str, msg: dict) -> Answer:
        return await self.patients.patient_revocation(caller, msg)
