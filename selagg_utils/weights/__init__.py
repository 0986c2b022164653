"""Engine room: where a backbone's weights come from, behind `selagg_utils.models`.

`hub` answers within seconds whether timm's pretrained weights are cached or downloadable (with
`network`, the reachability check), `files` reads local weights files of other training code (a
known nesting or wrapper prefix removed) and writes this book's checkpoints atomically with their
manifest, and `training` is the run behind `make checkpoints`, which trains the shipped tiny
backbones. `models.load_backbone` is the only core call into it.
"""
