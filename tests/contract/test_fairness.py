"""Fair claiming (issue 9, item 1): a claim serves tenants in turn, then a tenant's batches in turn
(higher ``priority`` first), on every StateAPI implementation."""

from __future__ import annotations

from collections import Counter
from uuid import UUID, uuid4

from shared.state_api import ClaimedTask, StateAPI

from . import Conn, company
from .test_providers import PAID, add_paid_step, add_provider

STEP = "normalize_domain"


def by_batch(claimed: list[ClaimedTask]) -> Counter[UUID]:
    return Counter(c.task.batch_id for c in claimed)


async def new_batch(
    api: StateAPI, client: UUID, items: int, *, step: str = STEP, offset: int = 0
) -> UUID:
    return await api.create_batch(
        [step], [company(offset + i) for i in range(items)], client_id=client
    )


async def test_a_one_item_batch_is_claimed_behind_a_big_one_of_another_tenant(
    state_api: StateAPI,
) -> None:
    big = await new_batch(state_api, uuid4(), 5000)
    small = await new_batch(state_api, uuid4(), 1)

    claimed = by_batch(await state_api.claim(1000))

    assert claimed == {big: 999, small: 1}


async def test_tenants_share_a_claim_in_turn_then_their_batches(state_api: StateAPI) -> None:
    a, b, c = uuid4(), uuid4(), uuid4()
    a1 = await new_batch(state_api, a, 50)
    a2 = await new_batch(state_api, a, 50)
    b1 = await new_batch(state_api, b, 50)
    c1 = await new_batch(state_api, c, 5)

    claimed = by_batch(await state_api.claim(30))

    # Rounds 1-5: one row of each tenant (C then has none left); rounds 6-12: one of A and one of
    # B; round 13: one more row of A or B (the tie of a round goes either way). A alternates
    # between its two batches.
    assert claimed[c1] == 5
    assert {claimed[a1] + claimed[a2], claimed[b1]} <= {12, 13}
    assert claimed[a1] + claimed[a2] + claimed[b1] == 25
    assert {claimed[a1], claimed[a2]} <= {6, 7}


async def test_priority_orders_batches_within_their_tenant_only(
    state_api: StateAPI, conn: Conn
) -> None:
    a, b = uuid4(), uuid4()
    low = await new_batch(state_api, a, 20)
    high = await new_batch(state_api, a, 20)
    other = await new_batch(state_api, b, 20)
    await conn.execute("update batches set priority = 5 where id = %s", (high,))

    claimed = by_batch(await state_api.claim(20))

    # A's rows come from its higher-priority batch first; B still gets its half.
    assert low not in claimed
    assert claimed == {high: 10, other: 10}


async def test_paid_rows_are_shared_between_tenants_too(state_api: StateAPI, conn: Conn) -> None:
    await add_provider(conn, requests_per_second=0.001, burst=10)
    await add_paid_step(conn)
    big = await new_batch(state_api, uuid4(), 100, step=PAID)
    small = await new_batch(state_api, uuid4(), 2, step=PAID)

    claimed = by_batch(await state_api.claim(100))

    # Ten tokens: both of the small tenant's rows, eight of the big one's.
    assert claimed == {big: 8, small: 2}
