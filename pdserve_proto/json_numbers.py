"""Bounded digits in every JSON number a schema allows (RFC 7493's I-JSON range), so that
sampling under a JSON grammar cannot write digits until it runs out of tokens: a greedy
small model otherwise answers `"population": 1111111...` to the end. pdserve_proto.grammars
applies it to every JSON schema before llguidance compiles it; server.tools to the
arguments of a forced tool call.
"""

# I-JSON (RFC 7493): an integer beyond +-(2^53-1) is not interoperable (a double cannot
# hold it exactly). The bound of every integer, and of a number's integer part, that the
# schema leaves open.
IJSON_MAX = 2**53 - 1
# The multipleOf given to a number: at most 9 digits after the point. llguidance writes
# no exponent in a number with a bound, so this and IJSON_MAX bound its length. (1e-10 is
# the finest step llguidance compiles: it reads the step as a double, and 1e-11's has too
# many digits.)
FRACTION_STEP = 1e-9
ANY_VALUE = "pdserve_json_value"  # the $defs entry of any JSON value, numbers bounded
_ANY_REF = {"$ref": f"#/$defs/{ANY_VALUE}"}
_ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "deprecated",
                "readOnly", "writeOnly"}
_NUMERIC_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
# Where subschemas are, by shape. Not "not", "if" or "propertyNames": narrowing a schema
# there would widen (or switch) what the whole accepts.
_VALUE_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_VALUE_LISTS = ("anyOf", "oneOf", "prefixItems")
_VALUE_ONES = ("additionalProperties", "items", "additionalItems", "unevaluatedItems",
               "unevaluatedProperties")
_OTHER_MAPS = ("dependentSchemas",)
_OTHER_LISTS = ("allOf",)
_OTHER_ONES = ("contains", "then", "else")
_INTERSECTED = ("$ref", "allOf", "anyOf", "oneOf")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _uses_multiple_of(schema) -> bool:
    if isinstance(schema, dict):
        return "multipleOf" in schema or any(_uses_multiple_of(v) for v in schema.values())
    if isinstance(schema, list):
        return any(_uses_multiple_of(v) for v in schema)
    return False


def _bound_range(out: dict) -> None:
    """Add the I-JSON bound on each side the schema leaves open (when that leaves the
    schema satisfiable: a minimum above IJSON_MAX keeps the top open)."""
    lows = [out[k] for k in ("minimum", "exclusiveMinimum") if k in out]
    highs = [out[k] for k in ("maximum", "exclusiveMaximum") if k in out]
    if not all(_is_number(v) for v in lows + highs):
        return  # llguidance says what is wrong with it
    if not highs and (not lows or max(lows) < IJSON_MAX
                      or (max(lows) == IJSON_MAX and out.get("exclusiveMinimum") != IJSON_MAX)):
        out["maximum"] = IJSON_MAX
    if not lows and (not highs or min(highs) > -IJSON_MAX
                     or (min(highs) == -IJSON_MAX and out.get("exclusiveMaximum") != -IJSON_MAX)):
        out["minimum"] = -IJSON_MAX


class _Bounder:
    def __init__(self, fraction: bool, any_values: bool):
        self.fraction = fraction  # add multipleOf FRACTION_STEP to numbers
        self.any_values = any_values  # an unconstrained value becomes _ANY_REF
        self.used_any = False

    def value(self, schema, any_ok: bool, root: bool = False):
        """A subschema in a place that holds a value (a property, an item, an option)."""
        if any_ok and (schema is True or (isinstance(schema, dict)
                                           and set(schema) <= _ANNOTATIONS)):
            self.used_any = True
            return dict(_ANY_REF)
        return self.schema(schema, any_ok, root)

    def schema(self, schema, any_ok: bool, root: bool = False):
        if not isinstance(schema, dict):
            return schema
        out = dict(schema)
        # A nested resource: "#/$defs/..." there would not name the root's.
        any_ok = any_ok and (root or ("$id" not in out and "id" not in out))
        for key in _VALUE_MAPS + _OTHER_MAPS:
            if isinstance(out.get(key), dict):
                place = key in _VALUE_MAPS and any_ok
                out[key] = {k: self.value(v, place) for k, v in out[key].items()}
        for key in _VALUE_LISTS + _OTHER_LISTS:
            if isinstance(out.get(key), list):
                place = key in _VALUE_LISTS and any_ok
                out[key] = [self.value(v, place) for v in out[key]]
        for key in _VALUE_ONES + _OTHER_ONES:
            if isinstance(out.get(key), list) and key == "items":  # draft 4 tuple
                out[key] = [self.value(v, any_ok) for v in out[key]]
            elif key in out:
                out[key] = self.value(out[key], key in _VALUE_ONES and any_ok)
        types = out.get("type")
        types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
        # Not beside $ref, allOf, anyOf or oneOf: llguidance intersects this schema with
        # theirs, and two of _ANY_REF intersected recurse without end.
        if any_ok and self.any_values and not any(k in out for k in _INTERSECTED):
            if (("object" in types or "properties" in out)
                    and "additionalProperties" not in out
                    and "unevaluatedProperties" not in out):
                self.used_any = True
                out["additionalProperties"] = dict(_ANY_REF)
            if ("array" in types and "items" not in out and "additionalItems" not in out
                    and "unevaluatedItems" not in out):
                self.used_any = True
                out["items"] = dict(_ANY_REF)
        untyped = "type" not in out and any(k in out for k in _NUMERIC_KEYS)
        if ("integer" in types or "number" in types or untyped) \
                and "enum" not in out and "const" not in out:
            _bound_range(out)
            if self.fraction and ("number" in types or untyped) and "multipleOf" not in out:
                out["multipleOf"] = FRACTION_STEP
        return out


def _any_value_schema(fraction: bool = True) -> dict:
    """Any JSON value, its numbers (at any depth) bounded as bounded_numbers does."""
    number = {"type": "number", "minimum": -IJSON_MAX, "maximum": IJSON_MAX}
    if fraction:
        number["multipleOf"] = FRACTION_STEP
    return {"anyOf": [{"type": "null"}, {"type": "boolean"}, number, {"type": "string"},
                      {"type": "array", "items": dict(_ANY_REF)},
                      {"type": "object", "additionalProperties": dict(_ANY_REF)}]}


def bounded_numbers(schema, any_values: bool = True):
    """The JSON schema with a bounded count of digits in every number it allows, so
    that sampling cannot write digits until max_tokens: where the schema gives no bound,
    an integer (and a number's integer part) keeps to I-JSON's +-(2^53-1); a bound the
    schema gives stays, and one given on one side only gets I-JSON's on the other. A
    number (not an integer) gets multipleOf FRACTION_STEP, unless the schema says
    multipleOf anywhere (llguidance's intersection of two multipleOf can reject valid
    values, silently). With any_values, a value the schema leaves unconstrained (`{}`,
    `true`, an object's undeclared properties, an array's items) becomes any JSON with
    such numbers (the root gains $defs.pdserve_json_value). The input is not modified."""
    if not isinstance(schema, dict):
        return schema
    bounder = _Bounder(fraction=not _uses_multiple_of(schema), any_values=any_values)
    out = bounder.value(schema, any_ok=any_values, root=True)
    if bounder.used_any:
        defs = out.get("$defs", {})
        if not isinstance(defs, dict) or ANY_VALUE in defs:
            return bounded_numbers(schema, any_values=False)
        out["$defs"] = {**defs, ANY_VALUE: _any_value_schema(bounder.fraction)}
    return out
