"""The prefix directory and the routing estimate (plain Python, no cluster)."""

from cluster.directory import PrefixDirectoryState
from cluster.router import estimate_costs
from workers.pools import BLOCK
from workers.prefix_cache import block_hashes


def test_directory_matches_leading_blocks_per_replica():
    d = PrefixDirectoryState()
    chain = block_hashes(list(range(4 * BLOCK)), "m")
    assert d.publish("a", chain[:3], [], full=True)
    assert d.publish("b", chain[:1], [], full=True)
    assert d.match(chain) == {"a": 3, "b": 1}
    assert d.publish("a", [], [chain[1]])  # a hole: a's match stops before it
    assert d.match(chain) == {"a": 1, "b": 1}
    assert d.match(block_hashes(list(range(1, 4 * BLOCK + 1)), "m")) == {}


def test_directory_asks_unknown_replicas_for_a_full_listing_and_forgets_dead_ones():
    d = PrefixDirectoryState()
    chain = block_hashes(list(range(2 * BLOCK)), "m")
    assert not d.publish("new", chain, [])  # a delta from a replica it never heard of (e.g. after a restart)
    assert d.match(chain) == {}
    assert d.publish("new", chain, [], full=True)
    assert d.match(chain) == {"new": 2}
    d.forget("new")
    assert d.match(chain) == {} and d.size()["blocks"] == 0


def test_estimate_prefers_the_replica_holding_the_prefix_unless_it_is_busier_than_the_saving():
    costs = estimate_costs(4096, {"a": 12}, {}, ["a", "b"], replay_tokens=0)
    assert costs == {"a": 4096 - 12 * BLOCK, "b": 4096}
    busy = estimate_costs(4096, {"a": 12}, {"a": 5000}, ["a", "b"], replay_tokens=0)
    assert min(busy, key=busy.get) == "b"


def test_estimate_charges_the_replay_of_the_recompute_policy():
    costs = estimate_costs(4096, {"a": 12}, {}, ["a", "b"], replay_tokens=635)
    assert costs["a"] == 4096 - 12 * BLOCK + 635


def test_a_hash_chain_extended_from_a_known_prefix_equals_one_computed_whole():
    tokens = list(range(5 * BLOCK + 7))
    head = block_hashes(tokens[: 2 * BLOCK], "m")
    assert block_hashes(tokens, "m", head) == block_hashes(tokens, "m")
    assert block_hashes(tokens, "m", head)[:2] == head and len(block_hashes(tokens, "m")) == 5


def test_decode_placement_needs_room_then_prefers_the_smallest_batch_then_the_most_free_pages():
    from cluster.router import decode_order

    stats = {"full": {"free_blocks": 3, "running": 0}, "busy": {"free_blocks": 90, "running": 7},
             "quiet": {"free_blocks": 40, "running": 2}, "roomy": {"free_blocks": 80, "running": 2}}
    assert decode_order(10, stats, {}, list(stats)) == ["roomy", "quiet", "busy", "full"]
    # reservations sent lately count against a replica before its polled stats show them
    assert decode_order(10, stats, {"roomy": [40, 35]}, list(stats))[:2] == ["quiet", "busy"]
