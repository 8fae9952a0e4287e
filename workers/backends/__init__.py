"""What stands behind ``loaded.model(**inputs)``: torch or OpenVINO, the forward path, the accuracy gate."""
