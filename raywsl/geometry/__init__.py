"""The geometry toolkit every stage shares: SDF backends (sdf.py), surface and query sampling
(sampling.py), fields to meshes (extract.py: marching cubes, dense or coarse-to-fine, `decode_rows`),
distances between clouds (distances.py), topology, shape metrics (shape.py) and figures (figures.py)."""
