// The spec text of the submit form as a document: JSON, or the part of YAML that specs are
// written in (the examples/ files): block and flow mappings and lists, plain and quoted
// scalars, comments. No library: the page loads nothing from outside the machine. Scalars
// are read as PyYAML's safe_load reads them (yes/no/on/off are booleans), so a spec means
// the same here as with `aetrain submit`. Anchors, tags and multi-line strings are refused
// with a message that says so, rather than read differently.
"use strict";

class SpecSyntaxError extends Error {
  constructor(line, message) {
    super(line ? `line ${line}: ${message}` : message);
    this.line = line;
    this.reason = message;
  }
}

const BOOLEANS = new Map([
  ["true", true], ["yes", true], ["on", true], ["false", false], ["no", false], ["off", false],
]);

function plainScalar(raw) {
  if (raw === "" || raw === "~" || /^null$/i.test(raw)) return null;
  const lower = raw.toLowerCase();
  if (BOOLEANS.has(lower) && (raw === lower || raw === raw.toUpperCase()
      || raw === raw[0].toUpperCase() + raw.slice(1).toLowerCase())) {
    return BOOLEANS.get(lower);
  }
  if (/^[-+]?\d+$/.test(raw)) return Number(raw);
  if (/^[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?$/.test(raw)) return Number(raw);
  if (/^[-+]?\.inf$/i.test(raw)) return raw.startsWith("-") ? -Infinity : Infinity;
  if (/^[&*!|>%@`]/.test(raw)) {
    throw new Error(`'${raw[0]}' (anchors, tags, block strings) is not read here: use JSON`);
  }
  return raw;
}

// A comment starts at a '#' after a space, outside quotes.
function stripComment(line) {
  let quote = null;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quote) {
      if (c === "\\" && quote === '"') i++;
      else if (c === quote) quote = null;
    } else if (c === '"' || c === "'") {
      quote = c;
    } else if (c === "#" && (i === 0 || line[i - 1] === " " || line[i - 1] === "\t")) {
      return line.slice(0, i);
    }
  }
  return line;
}

// One flow value: `{a: 1, b: [2, 3]}`, `[128, 64]`, `"text"` or a plain scalar.
function parseFlow(src, line) {
  let i = 0;
  const fail = (what) => { throw new SpecSyntaxError(line, `${what} at column ${i + 1}`); };
  const ws = () => { while (src[i] === " " || src[i] === "\t") i++; };

  function quoted() {
    const q = src[i];
    let j = i + 1;
    let out = "";
    for (; j < src.length; j++) {
      if (q === '"' && src[j] === "\\") { j++; continue; }
      if (src[j] === q) {
        if (q === "'" && src[j + 1] === "'") { j++; continue; }
        break;
      }
    }
    if (j >= src.length) fail("unclosed quote");
    const body = src.slice(i, j + 1);
    out = q === '"' ? JSON.parse(body) : body.slice(1, -1).replaceAll("''", "'");
    i = j + 1;
    return out;
  }

  function plain(inFlow) {
    const start = i;
    while (i < src.length) {
      const c = src[i];
      if (inFlow && (c === "," || c === "}" || c === "]")) break;
      if (c === ":" && (i + 1 === src.length || " \t,}]".includes(src[i + 1]))) break;
      i++;
    }
    return src.slice(start, i).trim();
  }

  function value(inFlow) {
    ws();
    if (src[i] === "{") return mapping();
    if (src[i] === "[") return sequence();
    if (src[i] === '"' || src[i] === "'") return quoted();
    try {
      return plainScalar(plain(inFlow));
    } catch (err) {
      throw new SpecSyntaxError(line, err.message);
    }
  }

  function key() {
    ws();
    const k = src[i] === '"' || src[i] === "'" ? quoted() : plain(true);
    ws();
    if (src[i] !== ":") fail("expected ':'");
    i++;
    return String(k);
  }

  function mapping() {
    i++;
    const out = {};
    ws();
    if (src[i] === "}") { i++; return out; }
    for (;;) {
      const k = key();
      out[k] = value(true);
      ws();
      if (src[i] === ",") { i++; ws(); if (src[i] === "}") { i++; return out; } continue; }
      if (src[i] === "}") { i++; return out; }
      fail("expected ',' or '}'");
    }
  }

  function sequence() {
    i++;
    const out = [];
    ws();
    if (src[i] === "]") { i++; return out; }
    for (;;) {
      out.push(value(true));
      ws();
      if (src[i] === ",") { i++; ws(); if (src[i] === "]") { i++; return out; } continue; }
      if (src[i] === "]") { i++; return out; }
      fail("expected ',' or ']'");
    }
  }

  const result = value(false);
  ws();
  if (i < src.length) fail("unexpected text");
  return result;
}

function parseYaml(text) {
  const lines = [];
  text.split(/\r?\n/).forEach((raw, n) => {
    if (raw.includes("\t") && /^\s*\t/.test(raw)) {
      throw new SpecSyntaxError(n + 1, "a tab in the indentation");
    }
    const s = stripComment(raw).replace(/\s+$/, "");
    if (s.trim() === "" || s.trim() === "---") return;
    lines.push({ indent: s.length - s.trimStart().length, text: s.trim(), no: n + 1 });
  });
  if (lines.length === 0) throw new SpecSyntaxError(0, "the spec is empty");
  let pos = 0;
  const isItem = (t) => t === "-" || t.startsWith("- ");
  const KEY = /^("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[^\s"'{[\]},#&*!|>][^:]*?)\s*:(?:\s+(.*))?$/;

  function block(indent) {
    return isItem(lines[pos].text) ? sequence(indent) : mapping(indent);
  }

  function nested(parentIndent, sequenceAllowedAtParent) {
    const next = lines[pos];
    if (next && (next.indent > parentIndent
        || (sequenceAllowedAtParent && next.indent === parentIndent && isItem(next.text)))) {
      return block(next.indent);
    }
    return null;
  }

  function mapping(indent) {
    const out = {};
    while (pos < lines.length && lines[pos].indent === indent && !isItem(lines[pos].text)) {
      const { text, no } = lines[pos];
      const m = text.match(KEY);
      if (!m) {
        if (lines.length === 1) return parseFlow(text, no);  // a document on one line
        throw new SpecSyntaxError(no, "expected 'key: value'");
      }
      const k = /^["']/.test(m[1]) ? parseFlow(m[1], no) : m[1];
      if (Object.hasOwn(out, k)) throw new SpecSyntaxError(no, `'${k}' appears twice`);
      pos++;
      out[k] = m[2] !== undefined && m[2] !== "" ? parseFlow(m[2], no) : nested(indent, true);
    }
    if (pos < lines.length && lines[pos].indent > indent) {
      throw new SpecSyntaxError(lines[pos].no, "unexpected indentation");
    }
    return out;
  }

  function sequence(indent) {
    const out = [];
    while (pos < lines.length && lines[pos].indent === indent && isItem(lines[pos].text)) {
      const { text, no } = lines[pos];
      const rest = text.slice(1).trimStart();
      if (rest === "") {
        pos++;
        out.push(nested(indent, false));
      } else if (KEY.test(rest) && !/^[[{]/.test(rest)) {
        // `- key: value` opens a mapping whose keys line up with `key`
        lines[pos] = { indent: indent + (text.length - rest.length), text: rest, no };
        out.push(mapping(lines[pos].indent));
      } else {
        pos++;
        out.push(parseFlow(rest, no));
      }
    }
    return out;
  }

  const doc = block(lines[0].indent);
  if (pos < lines.length) throw new SpecSyntaxError(lines[pos].no, "unexpected indentation");
  return doc;
}

// The spec document of the form's text; a SpecSyntaxError names the line.
function parseSpecText(text) {
  const trimmed = text.trim();
  let doc;
  if (trimmed.startsWith("{")) {
    try {
      doc = JSON.parse(trimmed);
    } catch (err) {
      doc = parseYaml(text);  // flow YAML (`{kind: autoencoder, ...}`) is not JSON
    }
  } else {
    doc = parseYaml(text);
  }
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
    throw new SpecSyntaxError(0, "a spec is a mapping (kind, data, model, ...)");
  }
  return doc;
}

window.parseSpecText = parseSpecText;
window.SpecSyntaxError = SpecSyntaxError;
