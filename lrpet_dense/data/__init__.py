"""Small generated datasets in PASCAL VOC format, for tests and the quickstart (see ``toy_voc``)."""
