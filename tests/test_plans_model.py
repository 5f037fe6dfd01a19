"""Plans (cloudtask/plans.py): the JSON form and its problems at their paths, the stored form
each item's spec is rebuilt from, and the XML form (its own problems, and documents that try
entity expansion or external references). No servers."""

from __future__ import annotations

import copy
import json
import time
from datetime import datetime, timezone
from typing import Any

import pytest

from cloudtask.exceptions import ValidationError
from cloudtask.plans import (
    MAX_ITEMS,
    MAX_XML_BYTES,
    Plan,
    item_task_spec,
    parse_plan,
    plan_from_xml,
)
from cloudtask.task import parse_task

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
SHA = "ab" * 32

PLAN: dict[str, Any] = {
    "name": "nightly",
    "callback_url": "https://up.example/cb",
    "callback_secret": "up.hook",
    "items": [
        {
            "type": "etl",
            "name": "load-eu",
            "external_id": "42",
            "priority": 5,
            "not_before": "2026-12-05T03:00:00+01:00",
            "command": "./load.sh --region eu",
            "shell": True,
            "timeout": "10m",
            "retries": 2,
            "retry_delay": "30s",
            "cwd": "/srv",
            "run_as": "etl",
            "env": {"LEVEL": "info", "DB_PASSWORD": {"secret": "db.password"}},
        },
        {
            "type": "etl",
            "command": ["python", "run.py", "--day", "2026-12-05"],
            "file": "jobs.zip",
            "file_version": SHA,
            "description": "argv form, a stored file",
        },
        {
            "type": "notify",
            "external_id": "n-1",
            "http": {
                "url": "https://svc.example/hook",
                "method": "POST",
                "timeout": "30s",
                "headers": {"X-Team": "ops", "Authorization": {"secret": "hook.token"}},
                "body": '{"a": 1}',
                "expect_status": [200, 202],
            },
        },
    ],
}

XML = f"""<?xml version="1.0" encoding="UTF-8"?>
<plan name="nightly" callback_url="https://up.example/cb" callback_secret="up.hook">
  <!-- a comment is fine -->
  <item type="etl" name="load-eu" external_id="42" priority="5"
        not_before="2026-12-05T03:00:00+01:00" timeout="10m" retries="2" retry_delay="30s"
        shell="true" cwd="/srv" run_as="etl">
    <command>
      ./load.sh --region eu
    </command>
    <env name="LEVEL">info</env>
    <env name="DB_PASSWORD" secret="db.password"/>
  </item>
  <item type="etl" file="jobs.zip" file_version="{SHA}" description="argv form, a stored file">
    <arg>python</arg><arg>run.py</arg><arg>--day</arg><arg>2026-12-05</arg>
  </item>
  <item type="notify" external_id="n-1">
    <http url="https://svc.example/hook" method="POST" timeout="30s" expect_status="200, 202">
      <header name="X-Team">ops</header>
      <header name="Authorization" secret="hook.token"/>
      <body>{{"a": 1}}</body>
    </http>
  </item>
</plan>
"""


def problems_of(data: Any, **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as caught:
        parse_plan(data, **kwargs)
    return [(p.path, p.message) for p in caught.value.problems]


def paths_of(data: Any) -> list[str]:
    return [path for path, _ in problems_of(data)]


def xml_problems(body: bytes | str) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        plan_from_xml(body)
    assert all(p.path in ("xml", "items") for p in caught.value.problems)
    return [p.message for p in caught.value.problems]


def plan_with(*items: dict[str, Any]) -> dict[str, Any]:
    return {"items": list(items)}


def ok_item(**fields: Any) -> dict[str, Any]:
    return {"type": "etl", "command": "./run.sh", **fields}


# --- the JSON form ------------------------------------------------------------------------------


def test_a_plan_of_several_kinds_of_items_reads_and_each_spec_is_rebuilt_from_its_stored_form():
    plan = parse_plan(copy.deepcopy(PLAN), now=NOW)
    assert plan.name == "nightly"
    assert plan.callback_url == "https://up.example/cb"
    assert [i.index for i in plan.items] == [0, 1, 2]
    first, second, third = plan.items

    assert (first.name, first.type, first.priority, first.external_id) == (
        "load-eu",
        "etl",
        5,
        "42",
    )
    assert first.not_before == datetime(2026, 12, 5, 2, 0, tzinfo=timezone.utc)
    assert first.spec.command == "./load.sh --region eu" and first.spec.shell
    assert first.spec.group == "etl" and first.spec.timeout == 600.0
    assert first.spec.env == {"LEVEL": "info"}
    assert first.spec.secret_env == {"DB_PASSWORD": "db.password"}
    assert second.spec.command == ("python", "run.py", "--day", "2026-12-05")
    assert second.spec.file_version == SHA
    assert third.spec.http is not None and third.spec.http.secret_headers == {
        "Authorization": "hook.token"
    }

    for item in plan.items:
        assert item_task_spec(item.stored) == item.spec
        # what goes into MongoDB is plain JSON, and reads back the same from it
        assert item_task_spec(json.loads(json.dumps(item.stored))) == item.spec
        # and it is an item of the JSON form itself: submitted again, it gives the same item
        again = parse_plan(plan_with(item.stored)).items[0]
        assert (again.spec, again.stored, again.name, again.type) == (
            item.spec,
            item.stored,
            item.name,
            item.type,
        )
        assert (again.priority, again.not_before, again.external_id) == (
            item.priority,
            item.not_before,
            item.external_id,
        )
    assert first.stored["not_before"] == "2026-12-05T02:00:00Z"
    assert first.stored["env"]["DB_PASSWORD"] == {"secret": "db.password"}


def test_an_item_takes_defaults_for_what_is_not_given():
    plan = parse_plan(plan_with(ok_item(), {"type": "mail", "http": {"url": "https://m.example"}}))
    assert (plan.name, plan.callback_url) == ("", None)
    first, second = plan.items
    assert (first.name, second.name) == ("etl-1", "mail-2")
    assert (first.priority, first.not_before, first.external_id) == (0, None, None)
    assert first.stored["priority"] == 0 and first.stored["not_before"] is None
    assert item_task_spec(second.stored) == second.spec


def test_the_default_name_of_an_item_with_a_long_type_is_still_a_task_name():
    long_type = "t" * 128
    item = parse_plan(plan_with(*[ok_item(type=long_type)] * 12)).items[11]
    assert item.type == long_type
    assert item.name.endswith("-12") and len(item.name) == 128
    assert parse_task({"name": item.name, "schedule": {"every": "1m"}, "command": "x"})


def test_three_bad_items_are_each_reported_at_their_path_and_nothing_else():
    items = [
        ok_item(),
        ok_item(command=""),  # empty command
        ok_item(),
        {"type": "etl", "http": {"url": "ftp://nowhere"}},  # not a web URL
        ok_item(priority=1001),  # out of range
    ]
    assert problems_of(plan_with(*items)) == [
        ("items[1].command", "must not be empty"),
        ("items[3].http.url", "'ftp://nowhere' is not an http:// or https:// URL with a host"),
        ("items[4].priority", "expected a whole number from 0 to 1000, got 1001"),
    ]


def test_every_problem_of_one_plan_is_reported_together():
    data = {
        "name": "x" * 201,
        "callback_url": "ftp://up.example/cb",
        "owner": "ops",
        "items": [
            {"command": "./run.sh"},  # no type
            ok_item(type="not a group"),
            ok_item(name="bad name!", env={"1X": "v"}, retries=-1),
            "just a string",
            {"type": "etl"},  # nothing to run
        ],
    }
    assert sorted(paths_of(data)) == sorted(
        [
            "name",
            "callback_url",
            "owner",
            "items[0].type",
            "items[1].type",
            "items[2].name",
            "items[2].env.1X",
            "items[2].retries",
            "items[3]",
            "items[4].command",
        ]
    )


def test_two_items_with_one_external_id_are_refused_at_the_second():
    items = [ok_item(external_id="a"), ok_item(external_id="b"), ok_item(external_id="a")]
    [(path, message)] = problems_of(plan_with(*items))
    assert path == "items[2].external_id"
    assert "items[0]" in message
    # the same id in two different plans is each plan's own business
    assert parse_plan(plan_with(ok_item(external_id="a"))).items[0].external_id == "a"


@pytest.mark.parametrize(
    "external_id",
    ["", "x" * 201, "line\nbreak", "nul\0byte", "tab\there", 42, ["a"], "\ud800"],
)
def test_an_external_id_is_1_to_200_printable_characters(external_id: Any):
    assert paths_of(plan_with(ok_item(external_id=external_id))) == ["items[0].external_id"]


def test_an_external_id_of_200_printable_characters_is_taken():
    external_id = "é-" * 100
    assert parse_plan(plan_with(ok_item(external_id=external_id))).items[0].external_id == (
        external_id
    )


@pytest.mark.parametrize("key", ["schedule", "mode", "concurrency", "notify", "enabled", "owner"])
def test_keys_of_a_scheduled_task_are_refused_in_an_item(key: str):
    [(path, message)] = problems_of(plan_with(ok_item(**{key: None})))
    assert path == f"items[0].{key}"
    assert "an item takes" in message and "command" in message and "not_before" in message


def test_unknown_keys_of_a_plan_and_of_an_item_are_refused_at_their_paths():
    data = {"items": [ok_item(colour="red")], "schedule": {"every": "1m"}}
    problems = dict(problems_of(data))
    assert set(problems) == {"schedule", "items[0].colour"}
    assert "name, callback_url, callback_secret, items" in problems["schedule"]


def test_a_plan_has_at_least_one_item_and_at_most_max_items():
    assert paths_of({"items": []}) == ["items"]
    assert paths_of({}) == ["items"]
    assert paths_of({"items": {"type": "etl"}}) == ["items"]
    # over the limit: refused as a whole, the items themselves are not even read
    [(path, message)] = problems_of({"items": [{"bad": True}] * (MAX_ITEMS + 1)})
    assert path == "items" and f"{MAX_ITEMS:,}" in message
    assert len(parse_plan({"items": [ok_item()] * MAX_ITEMS}).items) == MAX_ITEMS


@pytest.mark.parametrize("data", [None, [ok_item()], "plan", 3, [[[[[]]]]]])
def test_something_other_than_an_object_is_refused_with_a_clear_message(data: Any):
    [(path, message)] = problems_of(data)
    assert path == "" and message.startswith("expected a plan object")


def test_a_plan_nested_too_deeply_is_refused_without_recursion():
    deep: Any = "x"
    for _ in range(100_000):
        deep = [deep]
    [(path, message)] = problems_of({"items": [ok_item(http={"url": "https://a.b", "body": deep})]})
    assert path.startswith("items[0].http.body") and "nested" in message


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2026-12-05T02:00:00Z", datetime(2026, 12, 5, 2, tzinfo=timezone.utc)),
        ("2026-12-05T04:30:00+02:30", datetime(2026, 12, 5, 2, tzinfo=timezone.utc)),
        ("2026-12-04T21:00:00-05:00", datetime(2026, 12, 5, 2, tzinfo=timezone.utc)),
        (None, None),
    ],
)
def test_not_before_is_an_instant_with_an_offset_kept_in_utc(given: Any, expected: Any):
    item = parse_plan(plan_with(ok_item(not_before=given)), now=NOW).items[0]
    assert item.not_before == expected
    if expected is not None:
        assert item.not_before.utcoffset() == timezone.utc.utcoffset(None)
        assert item.stored["not_before"] == "2026-12-05T02:00:00Z"


@pytest.mark.parametrize(
    "given", ["2026-12-05T02:00:00", "tomorrow", "", 1765000000, "9999-01-01T00:00:00Z"]
)
def test_a_not_before_without_an_offset_or_unreadable_is_refused(given: Any):
    [(path, message)] = problems_of(plan_with(ok_item(not_before=given)))
    assert path == "items[0].not_before" and message


def test_a_not_before_already_past_is_taken_the_item_is_simply_due():
    item = parse_plan(plan_with(ok_item(not_before="2020-01-01T00:00:00Z")), now=NOW).items[0]
    assert item.not_before == datetime(2020, 1, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize("priority", [0, 1, 999, 1000])
def test_priorities_from_0_to_1000_are_taken(priority: int):
    assert parse_plan(plan_with(ok_item(priority=priority))).items[0].priority == priority


@pytest.mark.parametrize("priority", [-1, 1001, "5", 2.0, True, [1]])
def test_other_priorities_are_refused(priority: Any):
    [(path, message)] = problems_of(plan_with(ok_item(priority=priority)))
    assert path == "items[0].priority" and "0 to 1000" in message


def test_task_fields_of_an_item_follow_the_rules_of_a_task_at_the_items_path():
    item = ok_item(
        timeout="soon",
        retries=101,
        shell="yes",
        file_version=SHA,  # without a file
        env={"OK": "v", "SECRET": {"secret": "9bad"}},
        run_as="root; rm -rf /",
    )
    assert sorted(paths_of(plan_with(item))) == [
        "items[0].env.SECRET",
        "items[0].file_version",
        "items[0].retries",
        "items[0].run_as",
        "items[0].shell",
        "items[0].timeout",
    ]
    both = ok_item(http={"url": "https://a.example"})
    assert paths_of(plan_with(both)) == ["items[0].http"]


def test_a_plan_label_and_callback_url_are_checked():
    assert paths_of({"name": 5, "items": [ok_item()]}) == ["name"]
    assert paths_of({"name": "a\nb", "items": [ok_item()]}) == ["name"]
    assert paths_of({"callback_url": "not a url", "items": [ok_item()]}) == ["callback_url"]
    assert paths_of({"callback_url": "https://x" + "y" * 3000, "items": [ok_item()]}) == [
        "callback_url"
    ]
    plan = parse_plan(
        {
            "name": "x" * 200,
            "callback_url": "http://up:8080/cb?p=1",
            "callback_secret": "up.hook",
            "items": [ok_item()],
        }
    )
    assert plan.callback_url == "http://up:8080/cb?p=1" and plan.callback_secret == "up.hook"
    # a callback is signed: a URL needs the secret, and the secret a URL
    assert paths_of({"callback_url": "https://up/cb", "items": [ok_item()]}) == ["callback_secret"]
    assert paths_of({"callback_secret": "up.hook", "items": [ok_item()]}) == ["callback_secret"]
    assert paths_of(
        {"callback_url": "https://up/cb", "callback_secret": "no spaces", "items": [ok_item()]}
    ) == ["callback_secret"]


def test_item_task_spec_refuses_a_stored_form_that_does_not_parse():
    stored = parse_plan(plan_with(ok_item())).items[0].stored
    with pytest.raises(ValidationError) as caught:
        item_task_spec({**stored, "type": "no good"})
    assert [p.path for p in caught.value.problems] == ["type"]
    with pytest.raises(ValidationError):
        item_task_spec(["not", "stored"])  # type: ignore[arg-type]


# --- the XML form -------------------------------------------------------------------------------


def test_the_xml_form_gives_the_same_plan_as_the_json_form():
    from_xml = parse_plan(plan_from_xml(XML), now=NOW)
    assert isinstance(from_xml, Plan)
    assert from_xml == parse_plan(copy.deepcopy(PLAN), now=NOW)
    assert parse_plan(plan_from_xml(XML.encode("utf-8"))) == from_xml


def test_task_is_another_word_for_item():
    as_items = plan_from_xml(XML)
    as_tasks = plan_from_xml(XML.replace("<item ", "<task ").replace("</item>", "</task>"))
    assert as_tasks == as_items
    mixed = '<plan><task type="a" command="./x"/><item type="b" command="./y"/></plan>'
    assert [i.type for i in parse_plan(plan_from_xml(mixed)).items] == ["a", "b"]


def test_xml_attribute_values_are_converted_and_what_does_not_convert_is_refused_at_its_path():
    good = '<plan><item type="a" shell="false" priority=" 7 " retries="0" command="x"/></plan>'
    assert plan_from_xml(good)["items"][0] == {
        "type": "a",
        "shell": False,
        "priority": 7,
        "retries": 0,
        "command": "x",
    }
    bad = '<plan><item type="a" shell="maybe" priority="high" retries="two" command="x"/></plan>'
    assert sorted(paths_of(plan_from_xml(bad))) == [
        "items[0].priority",
        "items[0].retries",
        "items[0].shell",
    ]


def test_an_xml_element_or_attribute_that_is_not_part_of_a_plan_is_refused_with_its_line():
    body = "\n".join(
        [
            "<plan owner='ops'>",  # line 1
            "  <item type='etl'>",
            "    <command>./run.sh</command>",
            "    <env name='A'>1</env>",
            "",
            "",
            "    <foo>bar</foo>",  # line 7
            "  </item>",
            "  <schedule every='1m'/>",  # line 9
            "  <item type='etl' mode='all'><command x='1'>y</command></item>",  # line 10
            "</plan>",
        ]
    )
    messages = xml_problems(body)
    assert messages[0].startswith("line 1: <plan> takes no attribute 'owner'")
    assert any(m.startswith("line 7: <foo> is not part of a plan item") for m in messages)
    assert any(m.startswith("line 9: <schedule> is not part of a plan") for m in messages)
    assert any(m.startswith("line 10: <item> takes no attribute 'mode'") for m in messages)
    assert any(m.startswith("line 10: <command> takes no attribute 'x'") for m in messages)
    assert len(messages) == 5


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("<tasks><item type='a' command='x'/></tasks>", "line 1: the document must be a <plan>"),
        ("<item type='a' command='x'/>", "line 1: the document must be a <plan>"),
        ("<plan>\n<item type='a'>run me</item></plan>", "line 2: text 'run me' is not part"),
        (
            "<plan><item type='a'><command>x</command><arg>y</arg></item></plan>",
            "line 1: give the command once",
        ),
        (
            "<plan><item type='a' command='x'><command>y</command></item></plan>",
            "line 1: the command is given twice",
        ),
        ("<plan><item type='a'><env>v</env></item></plan>", "line 1: <env> needs a name"),
        (
            "<plan><item type='a'><env name='S' secret='s'>v</env></item></plan>",
            "line 1: <env secret=...> takes no text",
        ),
        (
            "<plan><item type='a'><env name='A'>1</env><env name='A'>2</env></item></plan>",
            "line 1: <env name='A'> is given twice",
        ),
        (
            "<plan><item type='a'><http url='https://a.b'/><http url='https://c.d'/></item></plan>",
            "line 1: a second <http>",
        ),
        ("<plan xmlns='urn:x'><item/></plan>", "line 1: the document must be a <plan>"),
    ],
)
def test_xml_that_does_not_follow_the_form_is_refused_with_what_and_where(body: str, expected: str):
    messages = xml_problems(body)
    assert any(m.startswith(expected) for m in messages), messages


@pytest.mark.parametrize(
    ("body", "line"),
    [
        ("<plan><item type='a'>", 1),
        ("<plan>\n  <item type='a'/>\n  <item type=a/>\n</plan>", 3),
        ("<plan></item>", 1),
        ("", 1),
        ("not xml at all", 1),
        ("<plan>\n<item type='a' command='&undefined;'/></plan>", 2),
        (b"<plan name='\xff\xfe'/>", 1),  # not UTF-8
        ("<plan/><plan/>", 1),
    ],
)
def test_malformed_xml_is_refused_at_xml_with_its_line(body: str | bytes, line: int):
    [message] = xml_problems(body)
    assert message.startswith(f"line {line}, column ") and "not well-formed XML" in message


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<plan name="&lol9;"><item type="a" command="&lol9;"/></plan>
"""


def test_a_billion_laughs_document_is_refused_without_being_expanded():
    started = time.monotonic()
    [message] = xml_problems(BILLION_LAUGHS)
    assert time.monotonic() - started < 2
    assert message.startswith("line 2: a DOCTYPE") and "never expanded" in message
    assert "lollol" not in message


@pytest.mark.parametrize(
    "body",
    [
        '<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
        '<plan><item type="a"><command>&e;</command></item></plan>',
        '<!DOCTYPE plan SYSTEM "http://127.0.0.1:9/plan.dtd"><plan/>',
        '<!DOCTYPE x [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]><plan/>',
        '<!DOCTYPE x [<!ENTITY e "inline">]><plan name="&e;"/>',
    ],
)
def test_an_xxe_document_or_any_doctype_is_refused_and_nothing_is_read(body: str):
    [message] = xml_problems(body)
    assert "DOCTYPE" in message and "not accepted" in message
    assert "root:" not in message and "inline" not in message
    assert message.startswith("line 1: ")


def test_xml_over_the_size_cap_is_refused_before_it_is_parsed():
    padding = b" " * (MAX_XML_BYTES - len(b"<plan/>"))
    assert plan_from_xml(b"<plan/>" + padding) == {"items": []}  # at the cap: parsed
    [message] = xml_problems(b"<plan/>" + padding + b" ")
    assert "16 MiB" in message
    [message] = xml_problems("<" * (MAX_XML_BYTES + 1))  # text: refused unparsed as well
    assert "16 MiB" in message


def test_xml_with_more_than_max_items_is_refused_as_it_is_read():
    body = "<plan>" + "<item type='a' command='x'/>" * (MAX_ITEMS + 1) + "</plan>"
    with pytest.raises(ValidationError) as caught:
        plan_from_xml(body)
    [problem] = caught.value.problems
    assert problem.path == "items" and f"{MAX_ITEMS:,}" in problem.message


def test_elements_nested_deep_inside_an_unknown_one_stop_the_reading():
    body = "<plan>" + "<a>" * 1_000_000
    messages = xml_problems(body)
    assert messages[0].startswith("line 1: <a> is not part of a plan")
    assert "nested more than" in messages[-1]


def test_xml_text_and_encodings():
    latin1 = b"<?xml version='1.0' encoding='ISO-8859-1'?><plan name='caf\xe9'/>"
    assert plan_from_xml(latin1)["name"] == "café"
    # text is text already: the encoding its declaration names does not apply to it
    text = "<?xml version='1.0' encoding='ISO-8859-1'?><plan name='café'/>"
    assert plan_from_xml(text)["name"] == "café"
    assert xml_problems("<plan name='\ud800'/>")[0].startswith("not valid text")
    with pytest.raises(ValidationError):
        plan_from_xml(42)  # type: ignore[arg-type]
