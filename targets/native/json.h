// A minimal JSON reader for manifest.json and .mlxfn signatures, and Python's canonical
// `json.dumps(data, sort_keys=True, separators=(",", ":"))`, which the manifest's seal
// hashes (mebp_compiler/checksums.py). RFC 8259 values; numbers keep their text, so an
// integer and a float that compare equal still print as Python prints them.
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace json {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Value {
  enum class Kind { Null, Bool, Number, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  std::string text;  // a number's source text, or a string's decoded UTF-8
  std::vector<Value> items;
  std::map<std::string, Value> members;  // std::map: sorted by UTF-8 bytes = code points

  bool is_object() const { return kind == Kind::Object; }
  bool has(const std::string& key) const { return is_object() && members.count(key); }
  const Value& operator[](const std::string& key) const {
    auto it = members.find(key);
    if (kind != Kind::Object || it == members.end()) throw Error("missing field '" + key + "'");
    return it->second;
  }
  const std::vector<Value>& array() const {
    if (kind != Kind::Array) throw Error("expected a list");
    return items;
  }
  const std::string& str() const {
    if (kind != Kind::String) throw Error("expected a string");
    return text;
  }
  bool is_integer() const { return kind == Kind::Number && text.find_first_of(".eE") == std::string::npos; }
  int64_t integer() const {
    int64_t v = 0;
    if (!is_integer() || std::from_chars(text.data(), text.data() + text.size(), v).ec != std::errc())
      throw Error("expected an integer");
    return v;
  }
  double number() const {
    if (kind != Kind::Number) throw Error("expected a number");
    return std::stod(text);
  }
  bool truth() const {
    if (kind != Kind::Bool) throw Error("expected true or false");
    return boolean;
  }
};

class Parser {
 public:
  explicit Parser(const std::string& s) : s_(s) {}
  Value document() {
    Value v = value();
    space();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& what) { throw Error(what + " at byte " + std::to_string(i_)); }
  void space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  bool eat(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(i_, n, word) != 0) return false;
    i_ += n;
    return true;
  }
  Value value() {
    space();
    if (i_ >= s_.size()) fail("unexpected end");
    Value v;
    char c = s_[i_];
    if (c == '{') {
      v.kind = Value::Kind::Object;
      ++i_;
      space();
      if (i_ < s_.size() && s_[i_] == '}') return ++i_, v;
      for (;;) {
        space();
        if (i_ >= s_.size() || s_[i_] != '"') fail("expected a key");
        std::string key = string();
        space();
        if (i_ >= s_.size() || s_[i_++] != ':') fail("expected ':'");
        v.members[key] = value();
        space();
        if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
        if (i_ < s_.size() && s_[i_] == '}') return ++i_, v;
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.kind = Value::Kind::Array;
      ++i_;
      space();
      if (i_ < s_.size() && s_[i_] == ']') return ++i_, v;
      for (;;) {
        v.items.push_back(value());
        space();
        if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
        if (i_ < s_.size() && s_[i_] == ']') return ++i_, v;
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.kind = Value::Kind::String;
      v.text = string();
      return v;
    }
    if (eat("true")) { v.kind = Value::Kind::Bool; v.boolean = true; return v; }
    if (eat("false")) { v.kind = Value::Kind::Bool; return v; }
    if (eat("null")) return v;
    size_t start = i_;
    if (i_ < s_.size() && s_[i_] == '-') ++i_;
    while (i_ < s_.size() && std::string_view("0123456789.eE+-").find(s_[i_]) != std::string_view::npos) ++i_;
    if (i_ == start) fail("unexpected character");
    v.kind = Value::Kind::Number;
    v.text = s_.substr(start, i_ - start);
    return v;
  }
  unsigned hex4() {
    if (i_ + 4 > s_.size()) fail("short \\u escape");
    unsigned u = 0;
    if (std::from_chars(s_.data() + i_, s_.data() + i_ + 4, u, 16).ptr != s_.data() + i_ + 4) fail("bad \\u escape");
    i_ += 4;
    return u;
  }
  std::string string() {
    ++i_;  // opening quote
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c != '\\') { out += c; continue; }
      if (i_ >= s_.size()) break;
      char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && eat("\\u")) cp = 0x10000 + ((cp - 0xD800) << 10) + (hex4() - 0xDC00);
          if (cp < 0x80) out += char(cp);
          else if (cp < 0x800) { out += char(0xC0 | cp >> 6); out += char(0x80 | (cp & 0x3F)); }
          else if (cp < 0x10000) {
            out += char(0xE0 | cp >> 12); out += char(0x80 | (cp >> 6 & 0x3F)); out += char(0x80 | (cp & 0x3F));
          } else {
            out += char(0xF0 | cp >> 18); out += char(0x80 | (cp >> 12 & 0x3F));
            out += char(0x80 | (cp >> 6 & 0x3F)); out += char(0x80 | (cp & 0x3F));
          }
          break;
        }
        default: fail("bad escape");
      }
    }
    if (i_ >= s_.size()) fail("unterminated string");
    ++i_;
    return out;
  }
};

inline Value parse(const std::string& text) { return Parser(text).document(); }

// Python's repr of a float: the shortest digits that round-trip, positional when the
// decimal exponent is in [-4, 16), else d.ddde[+-]XX.
inline std::string python_float(double x) {
  if (std::isnan(x)) return "NaN";
  if (std::isinf(x)) return x > 0 ? "Infinity" : "-Infinity";
  char buf[64];
  auto end = std::to_chars(buf, buf + sizeof buf, x, std::chars_format::scientific).ptr;
  std::string sci(buf, end);  // [-]d[.ddd]e[+-]XX
  size_t e = sci.find('e');
  int exponent = std::stoi(sci.substr(e + 1));
  bool negative = sci[0] == '-';
  std::string digits;
  for (size_t k = negative; k < e; ++k)
    if (sci[k] != '.') digits += sci[k];
  std::string out = negative ? "-" : "";
  if (exponent < -4 || exponent >= 16) {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char exp[16];
    std::snprintf(exp, sizeof exp, "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    return out + exp;
  }
  if (exponent < 0) return out + "0." + std::string(-exponent - 1, '0') + digits;
  if (digits.size() <= size_t(exponent) + 1) return out + digits + std::string(exponent + 1 - digits.size(), '0') + ".0";
  return out + digits.substr(0, exponent + 1) + "." + digits.substr(exponent + 1);
}

inline void dump_string(const std::string& s, std::string& out) {
  // ensure_ascii: everything outside ' '..'~' escaped, non-ASCII as UTF-16 \uXXXX.
  static const char* hex = "0123456789abcdef";
  auto u16 = [&](unsigned u) {
    out += "\\u";
    for (int shift = 12; shift >= 0; shift -= 4) out += hex[(u >> shift) & 0xF];
  };
  out += '"';
  for (size_t k = 0; k < s.size();) {
    unsigned char c = s[k];
    if (c == '"') out += "\\\"";
    else if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c == '\b') out += "\\b";
    else if (c == '\f') out += "\\f";
    else if (c >= 0x20 && c < 0x7F) out += char(c);
    else if (c < 0x80) u16(c);
    else {
      int extra = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : 1;
      unsigned cp = c & (0x3F >> extra);
      for (int j = 1; j <= extra && k + j < s.size(); ++j) cp = cp << 6 | (s[k + j] & 0x3F);
      k += extra;
      if (cp >= 0x10000) {
        cp -= 0x10000;
        u16(0xD800 + (cp >> 10));
        u16(0xDC00 + (cp & 0x3FF));
      } else {
        u16(cp);
      }
    }
    ++k;
  }
  out += '"';
}

// `json.dumps(value, sort_keys=True, separators=(",", ":"))`, leaving out key `skip` of the top object.
inline void dump_canonical(const Value& v, std::string& out, const std::string& skip = "") {
  switch (v.kind) {
    case Value::Kind::Null: out += "null"; break;
    case Value::Kind::Bool: out += v.boolean ? "true" : "false"; break;
    case Value::Kind::Number: out += v.is_integer() ? std::to_string(v.integer()) : python_float(v.number()); break;
    case Value::Kind::String: dump_string(v.text, out); break;
    case Value::Kind::Array: {
      out += '[';
      for (size_t k = 0; k < v.items.size(); ++k) {
        if (k) out += ',';
        dump_canonical(v.items[k], out);
      }
      out += ']';
      break;
    }
    case Value::Kind::Object: {
      out += '{';
      bool first = true;
      for (const auto& [key, member] : v.members) {
        if (key == skip) continue;
        if (!first) out += ',';
        first = false;
        dump_string(key, out);
        out += ':';
        dump_canonical(member, out);
      }
      out += '}';
      break;
    }
  }
}

}  // namespace json
