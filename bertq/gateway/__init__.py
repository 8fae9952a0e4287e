"""The HTTP gateway (`bertq serve`, the `gateway` extra): a producer over HTTP for apps that cannot
reach Redis. It talks to Redis only through ``bertq.client.Client`` and loads no model."""
