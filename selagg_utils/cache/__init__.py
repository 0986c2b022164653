"""Engine room: the robust token cache behind `selagg_utils.features`.

An entry is one file per (weights, data, transform, block, precision): `keys` says what identifies
it and where it lives, `store` writes it as a stream of checksummed rows and maps it back after
verifying it, `locks` makes processes that fill one entry take turns, `files` holds the atomic
writes, the clean-up of orphaned temporaries and the digests, and `entries` ties them together
(`block_entries`, `pooled_entry`). Chapters never call it: `features.cached_tokens` and
`features.split_tokens` are its one door.
"""
