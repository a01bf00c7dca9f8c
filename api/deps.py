"""Shared FastAPI dependencies as Annotated aliases."""

from typing import Annotated

from fastapi import Depends, Request

from api.platform import Platform


def get_platform(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


PlatformDep = Annotated[Platform, Depends(get_platform)]
