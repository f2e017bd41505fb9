"""Stage one: video files -> MFNet clip features in the HDF5 cache (video, datasets, backbone, settings, extractor)."""
