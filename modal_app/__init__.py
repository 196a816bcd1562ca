"""The Modal workers: one function per registry step, each a thin call into ``shared.worker``."""
