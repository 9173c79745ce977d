"""Faces from photos: decoding (:mod:`~fahr.faces.decode`), detection (:mod:`~fahr.faces.mtcnn`) and
5-point alignment (:mod:`~fahr.faces.align`), shared by ``fahr predict`` / ``fahr far`` and the shard
builders in ``data_pipelines`` so that training crops and inference crops are made by one code path."""
