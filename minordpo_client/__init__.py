"""Python client of MinorDPO Service: typed methods for every route, retries, paginated and streamed iterators."""

from minordpo_client.client import Client
from minordpo_client.errors import ApiError, ClientError, ServerUnreachableError, WaitTimeoutError
from minordpo_client.sse import StreamMessage

__all__ = ["ApiError", "Client", "ClientError", "ServerUnreachableError", "StreamMessage", "WaitTimeoutError"]
