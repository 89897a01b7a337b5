"""HTTP routes for messages that start runs, for runs, and for the agent catalogue (API.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy import select, tuple_

from parley.agents.runs import RunNotFound
from parley.agents.schemas import AgentList, AgentOut, PostMessage, PostMessageResponse, RunOut, RunPage, ToolOut
from parley.errors import InvalidRequest
from parley.http.deps import CurrentUser, ServicesDep, SessionDep
from parley.storage.models import Run
from parley.threads.repository import ThreadRepository
from parley.tools.base import tool_spec

router = APIRouter(tags=["runs"])


@router.post("/api/threads/{thread_id}/messages", status_code=202)
async def post_message(thread_id: str, body: PostMessage, request: Request, principal: CurrentUser,
                       services: ServicesDep, session: SessionDep) -> PostMessageResponse:
    submission = await services.runs.submit(
        session, thread_id, principal.user_id, body.content, agent=body.agent, on_busy=body.on_busy,
        client_message_id=body.client_message_id, request_id=request.state.request_id,
        is_admin=principal.is_admin)
    services.runs.launch(submission)
    return PostMessageResponse(message=submission.message, run=submission.run)


@router.get("/api/threads/{thread_id}/runs")
async def list_runs(
    thread_id: str,
    principal: CurrentUser,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    before: Annotated[str | None, Query(max_length=64)] = None,
) -> RunPage:
    await ThreadRepository(session).get_for_user(principal.user_id, thread_id)
    query = select(Run).where(Run.thread_id == thread_id, Run.user_id == principal.user_id)
    if before is not None:
        anchor = (await session.execute(select(Run.created_at, Run.id).where(
            Run.id == before, Run.thread_id == thread_id, Run.user_id == principal.user_id))).one_or_none()
        if anchor is None:
            raise InvalidRequest(details=[{"field": "query.before", "type": "invalid",
                                           "message": "no such run in this thread"}])
        query = query.where(tuple_(Run.created_at, Run.id) < tuple_(anchor[0], anchor[1]))
    rows = list(await session.scalars(query.order_by(Run.created_at.desc(), Run.id.desc()).limit(limit + 1)))
    return RunPage(items=[RunOut.of(run) for run in rows[:limit]], has_more=len(rows) > limit)


@router.get("/api/runs/{run_id}")
async def get_run(run_id: str, principal: CurrentUser, session: SessionDep) -> RunOut:
    run = await session.scalar(select(Run).where(Run.id == run_id, Run.user_id == principal.user_id))
    if run is None:
        raise RunNotFound()
    return RunOut.of(run)


@router.post("/api/runs/{run_id}/cancel", status_code=202)
async def cancel_run(run_id: str, principal: CurrentUser, services: ServicesDep, session: SessionDep) -> RunOut:
    return await services.runs.cancel(session, principal.user_id, run_id)


@router.get("/api/agents")
async def list_agents(principal: CurrentUser, services: ServicesDep) -> AgentList:
    items = []
    for agent in services.agents.visible_to(principal.is_admin):
        tools = [tool_spec(services.tools.get(name)) for name in agent.tool_names]
        items.append(AgentOut(name=agent.name, description=agent.description,
                              tools=[ToolOut(name=t.name, description=t.description, parameters=t.parameters)
                                     for t in tools]))
    return AgentList(items=items)
