"""Engine room: image folders on disk and the Imagenette download, behind `selagg_utils.data`.

`folders` checks a folder of class sub-folders before any work (hidden entries left out, links
followed once, every image decoded at its colour depth), carves train and val from it by class, and
downloads Imagenette once (md5 checked), unpacked atomically under a lock. `data.load_dataset` is
its one door, and only at full scale.
"""
