"""Engine room: scaling out to many processes and to token stores larger than one file (chapter 8).

`distributed` joins torchrun's process group (or acts as rank 0 of 1), `shards` and `shard_files`
extract tokens by several processes into a sharded store and read them back by parts, `ddp_probing`
trains the same probe sweep across processes, `costs` is the arithmetic of what scaling out costs,
and `rehearsal` generates an Imagenette stand-in to rehearse on. No chapter before 8 imports it.
"""
