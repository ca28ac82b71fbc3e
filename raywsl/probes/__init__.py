"""Topology probes of weight space (papers/000: a shape foundation model's weight space, made
quantitative here and comparable across parameterisations):

    raywsl probe phase -c CONFIG      the connectivity phase transition along a path of conditions
                                      (point clouds through the encoder) or of weight rows: α*, its
                                      width, over seeds                                   (phase.py)
    raywsl probe subspace -c CONFIG   sampling inside the top-m PCA subspace of one category's
                                      conditions or rows: topology kept, validity, novelty and local
                                      variation as functions of m and the radius        (subspace.py)

Both decode what they sample with the run's field (common.py: rows -> meshes -> topology) and write
CSV tables, figures and a summary into <run.dir>/probe/<name>/, logged to MLflow.
"""
