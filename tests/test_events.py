"""The event registry and the conventions a subscriber declares (`nntrain.events`), and the
checkpoint keys they give (`state_key`)."""

from __future__ import annotations

import pytest

from nntrain.checkpoint_state import load_subscriber_states, state_keys, subscriber_states
from nntrain.events import EVENT_DOCS, EVENTS, Subscriber, declared, loop_pseudocode


def test_every_event_has_a_doc_and_a_place_in_the_loop():
    assert EVENTS == tuple(EVENT_DOCS) and all(EVENT_DOCS.values())
    loop = loop_pseudocode()
    assert all(event in loop for event in EVENTS)
    assert all(f"{event}: {doc}" in loop_pseudocode(with_docs=True) for event, doc in EVENT_DOCS.items())


class Counter(Subscriber):
    def __init__(self, n=0):
        self.n = n

    def before_fit(self, learn):
        pass

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


class Renamed(Counter):
    state_key = "Counter"  # keeps the state saved under the old class name


class Plain:
    """A subscriber that is no `Subscriber`: it gets every default."""

    def after_batch(self, learn):
        pass


def test_a_plain_object_gets_the_subscriber_defaults():
    assert [declared(Plain(), name) for name in ("order", "reports", "one_rank_cancels", "shows_rows",
                                                 "steps_every", "checkpoint_dir", "state_key")] == \
        [0, False, True, False, 1, None, None]
    assert declared(Plain(), "logged_names")(None) == () and declared(Plain(), "engine_needs")() == {}
    assert state_keys([Plain(), Plain()]) == ["Plain", "Plain#1"]


def test_state_is_keyed_by_state_key_so_a_rename_keeps_it_and_a_dropped_state_is_named():
    saved = subscriber_states([Counter(3), Counter(5), Plain()])
    assert saved == {"Counter": {"n": 3}, "Counter#1": {"n": 5}, "Plain": {}}
    a, b = Renamed(), Renamed()
    assert load_subscriber_states([a, b, Plain()], saved) == [] and (a.n, b.n) == (3, 5)
    with pytest.warns(RuntimeWarning, match=r"holds the state of Counter#1, which no attached subscriber takes"):
        assert load_subscriber_states([Renamed()], saved) == ["Counter#1"]
