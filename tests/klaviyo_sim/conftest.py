"""The simulator's tests use the client tests' fixtures: a simulator on 127.0.0.1 with one
account, key and list, clients that record what they send, and a clock moved by hand."""

from tests.klaviyo.conftest import Env, FakeClock, clock, env, make_env, sim

__all__ = ["Env", "FakeClock", "clock", "env", "make_env", "sim"]
