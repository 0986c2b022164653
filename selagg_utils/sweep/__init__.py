"""Engine room: the fast learning-rate sweep behind `selagg_utils.probing`.

`probing.train_one_probe` trains one head at one learning rate. A sweep trains the same head at
every learning rate and seed of a recipe, so `loop.fit_stack` runs that loop on a `stacks.ProbeStack`
of all the copies at once: one batch read, one batched forward for every copy (with a hand-written
gradient for AbMILP's pooling), and one multi-tensor optimizer step (`optimizers`) in which each
copy keeps its own learning rate. `probing.train_probes` is its one door.
"""
