"""Single flight: lead, follow (bounded), land, and hit-for-pass after a failed leader."""

from __future__ import annotations

import asyncio

from ai_cache.flights import SingleFlight
from ai_cache.state import FlowState, Status


async def NO_LOOKUP() -> None:
    raise AssertionError("no fleet: nothing to look up")


def miss(key: str = "k") -> FlowState:
    return FlowState("openai-chat", status=Status.MISS, key=key)


async def test_the_first_leads_and_followers_get_the_answer_once_it_lands():
    flights = SingleFlight()
    leader, other = miss(), miss("other")
    await flights.lead(leader, 5, NO_LOOKUP)
    await flights.lead(other, 5, NO_LOOKUP)
    assert leader.leader is True and other.leader is True
    follower = miss()
    waiting = asyncio.create_task(flights.answer(follower, 5, lambda: asyncio.sleep(0, ("entry", "l1"))))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    flights.land(leader)
    assert await asyncio.wait_for(waiting, 1) == ("entry", "l1")
    assert follower.followed is True


async def test_no_leader_means_no_wait_and_no_lookup():
    looked = []
    assert await SingleFlight().answer(miss(), 5, lambda: looked.append(1)) is None
    assert looked == []


async def test_a_second_request_does_not_lead_while_one_is_in_flight():
    flights = SingleFlight()
    first, second = miss(), miss()
    await flights.lead(first, 5, NO_LOOKUP)
    await flights.lead(second, 5, NO_LOOKUP)
    assert first.leader is True and second.leader is False
    waiting = asyncio.create_task(flights.answer(miss(), 5, lambda: asyncio.sleep(0, "answer")))
    flights.land(second)  # not the leader: the followers stay
    await asyncio.sleep(0.01)
    assert not waiting.done()
    flights.land(first)
    assert await asyncio.wait_for(waiting, 1) == "answer"
    third = miss()
    await flights.lead(third, 5, NO_LOOKUP)
    assert third.leader is True  # the key is free again


async def test_followers_of_a_failed_leader_pass_without_leading():
    flights = SingleFlight()
    leader = miss()
    await flights.lead(leader, 5, NO_LOOKUP)
    followers = [miss() for _ in range(3)]
    waits = [asyncio.create_task(flights.answer(f, 5, lambda: asyncio.sleep(0, None))) for f in followers]
    await asyncio.sleep(0.01)
    flights.land(leader)  # landed without a usable entry
    assert await asyncio.gather(*waits) == [None] * 3
    for follower in followers:
        await flights.lead(follower, 5, NO_LOOKUP)
    assert [f.leader for f in followers] == [None] * 3  # hit-for-pass: none of them leads


async def test_a_hidden_answer_releases_followers_only_once_written():
    flights = SingleFlight()
    leader = miss()
    await flights.lead(leader, 5, NO_LOOKUP)
    written = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(flights.answer(miss(), 5, lambda: asyncio.sleep(0, "answer")))
    flights.land(leader, written, hidden=True)
    await asyncio.sleep(0.01)
    assert not waiting.done()
    written.set_result(None)
    assert await asyncio.wait_for(waiting, 1) == "answer"


async def test_a_follower_waits_no_longer_than_its_timeout():
    flights = SingleFlight()
    await flights.lead(miss(), 5, NO_LOOKUP)
    follower = miss()
    assert await asyncio.wait_for(flights.answer(follower, 0.01, lambda: asyncio.sleep(0, None)), 1) is None
    assert follower.followed is True
