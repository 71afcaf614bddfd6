"""The runner: reads RTSP streams, one OS process per stream, and publishes sampled JPEG frames."""
