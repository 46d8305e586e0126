#include "daemon/core/expr.h"

#include <algorithm>
#include <cctype>
#include <limits>

#include "daemon/core/text.h"

namespace ws::expr {

enum class Op {
  kNum, kIdent, kNeg, kNot, kAdd, kSub, kMul, kDiv, kMod, kEq, kNe, kLt, kLe, kGt, kGe,
  kAnd, kOr, kCoalesce, kTernary, kCall,
};

struct Node {
  Op op = Op::kNum;
  int64_t num = 0;
  std::string name;  // identifier or function name
  std::string text;  // source text of this sub-expression (for messages)
  std::vector<std::shared_ptr<const Node>> kids;
  int height = 1;  // longest path to a leaf, in nodes
};

namespace {

using NodeP = std::shared_ptr<const Node>;

// Parsing, evaluation and destruction recurse over the expression tree: deeper
// nesting (parentheses, unary operators, chains like 1+1+...+1) is refused so
// that rule files and mappings from peers cannot overflow the stack.
constexpr int kMaxNesting = 128;

struct Token {
  enum Kind { kEnd, kNum, kIdent, kOp } kind = kEnd;
  std::string s;
  int64_t num = 0;
  size_t pos = 0;
};

class Parser {
 public:
  explicit Parser(const std::string& text) : text_(text) {}

  Result<NodeP> ParseAll() {
    if (text_.size() > kMaxExprBytes)
      return InvalidArgument("expression \"" + Truncate(text_, 64) + "\" is " + std::to_string(text_.size()) +
                             " bytes long (at most " + std::to_string(kMaxExprBytes) + ")");
    WS_RETURN_IF_ERROR(Tokenize());
    WS_ASSIGN_OR_RETURN(NodeP n, ParseExpr(0));
    if (Peek().kind != Token::kEnd) return Error("unexpected '" + Peek().s + "'");
    return n;
  }

 private:
  Status Error(const std::string& what) const {
    size_t pos = i_ < toks_.size() ? toks_[i_].pos : text_.size();
    return InvalidArgument("expression \"" + text_ + "\": " + what + " at position " + std::to_string(pos));
  }

  Status Tokenize() {
    size_t p = 0;
    while (p < text_.size()) {
      char c = text_[p];
      if (std::isspace(static_cast<unsigned char>(c))) { ++p; continue; }
      Token t;
      t.pos = p;
      if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t q = p;
        int64_t v = 0;
        while (q < text_.size() && std::isdigit(static_cast<unsigned char>(text_[q]))) {
          int d = text_[q] - '0';
          if (v > (std::numeric_limits<int64_t>::max() - d) / 10)
            return InvalidArgument("expression \"" + text_ + "\": integer literal too large");
          v = v * 10 + d;
          ++q;
        }
        if (q < text_.size() && (std::isalpha(static_cast<unsigned char>(text_[q])) || text_[q] == '.'))
          return InvalidArgument("expression \"" + text_ + "\": bad number at position " + std::to_string(p));
        t.kind = Token::kNum;
        t.num = v;
        t.s = text_.substr(p, q - p);
        p = q;
      } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t q = p;
        while (q < text_.size() && (std::isalnum(static_cast<unsigned char>(text_[q])) || text_[q] == '_')) ++q;
        t.kind = Token::kIdent;
        t.s = text_.substr(p, q - p);
        p = q;
      } else {
        static const char* kOps[] = {"??", "||", "&&", "==", "!=", "<=", ">=", "<", ">", "+", "-",
                                     "*", "/", "%", "!", "(", ")", ",", "?", ":"};
        bool found = false;
        for (const char* op : kOps) {
          size_t n = std::char_traits<char>::length(op);
          if (text_.compare(p, n, op) == 0) {
            t.kind = Token::kOp;
            t.s = op;
            p += n;
            found = true;
            break;
          }
        }
        if (!found)
          return InvalidArgument("expression \"" + text_ + "\": unexpected character '" + std::string(1, c) +
                                 "' at position " + std::to_string(p));
      }
      toks_.push_back(std::move(t));
    }
    Token end;
    end.pos = text_.size();
    toks_.push_back(end);
    return Status::Ok();
  }

  const Token& Peek() const { return toks_[i_]; }
  bool IsOp(const char* s) const { return Peek().kind == Token::kOp && Peek().s == s; }
  Status Expect(const char* s) {
    if (!IsOp(s)) return Error(std::string("expected '") + s + "'");
    ++i_;
    return Status::Ok();
  }

  std::string Span(size_t from_tok, size_t to_tok) const {
    size_t a = toks_[from_tok].pos;
    size_t b = to_tok < toks_.size() ? toks_[to_tok].pos : text_.size();
    std::string s = text_.substr(a, b - a);
    while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
    return s;
  }

  // Binding power of a binary / ternary operator token; 0 if none.
  static int Bp(const Token& t) {
    if (t.kind != Token::kOp) return 0;
    const std::string& s = t.s;
    if (s == "?") return 1;
    if (s == "??") return 2;
    if (s == "||") return 3;
    if (s == "&&") return 4;
    if (s == "==" || s == "!=") return 5;
    if (s == "<" || s == "<=" || s == ">" || s == ">=") return 6;
    if (s == "+" || s == "-") return 7;
    if (s == "*" || s == "/" || s == "%") return 8;
    return 0;
  }

  // Refuses `n` when it nests deeper than kMaxNesting.
  Status SetHeight(Node& n) const {
    for (const auto& k : n.kids) n.height = std::max(n.height, k->height + 1);
    if (n.height > kMaxNesting) return Error("nested more than " + std::to_string(kMaxNesting) + " levels deep");
    return Status::Ok();
  }

  Result<NodeP> ParseExpr(int min_bp) {
    struct Leave {
      int& d;
      ~Leave() { --d; }
    } leave{++depth_};
    if (depth_ > kMaxNesting) return Error("nested more than " + std::to_string(kMaxNesting) + " levels deep");
    size_t start = i_;
    WS_ASSIGN_OR_RETURN(NodeP lhs, ParsePrefix());
    while (true) {
      const Token& t = Peek();
      int bp = Bp(t);
      if (bp == 0 || bp <= min_bp) break;
      std::string op = t.s;
      ++i_;
      auto n = std::make_shared<Node>();
      if (op == "?") {
        WS_ASSIGN_OR_RETURN(NodeP a, ParseExpr(0));
        WS_RETURN_IF_ERROR(Expect(":"));
        WS_ASSIGN_OR_RETURN(NodeP b, ParseExpr(0));
        n->op = Op::kTernary;
        n->kids = {lhs, a, b};
      } else {
        WS_ASSIGN_OR_RETURN(NodeP rhs, ParseExpr(bp));
        n->kids = {lhs, rhs};
        if (op == "??") n->op = Op::kCoalesce;
        else if (op == "||") n->op = Op::kOr;
        else if (op == "&&") n->op = Op::kAnd;
        else if (op == "==") n->op = Op::kEq;
        else if (op == "!=") n->op = Op::kNe;
        else if (op == "<") n->op = Op::kLt;
        else if (op == "<=") n->op = Op::kLe;
        else if (op == ">") n->op = Op::kGt;
        else if (op == ">=") n->op = Op::kGe;
        else if (op == "+") n->op = Op::kAdd;
        else if (op == "-") n->op = Op::kSub;
        else if (op == "*") n->op = Op::kMul;
        else if (op == "/") n->op = Op::kDiv;
        else n->op = Op::kMod;
      }
      n->text = Span(start, i_);
      WS_RETURN_IF_ERROR(SetHeight(*n));
      lhs = n;
    }
    return lhs;
  }

  Result<NodeP> ParsePrefix() {
    size_t start = i_;
    const Token t = Peek();
    auto n = std::make_shared<Node>();
    if (t.kind == Token::kNum) {
      ++i_;
      n->op = Op::kNum;
      n->num = t.num;
    } else if (t.kind == Token::kIdent) {
      ++i_;
      if (t.s == "true" || t.s == "false") {
        n->op = Op::kNum;
        n->num = t.s == "true";
      } else if (IsOp("(")) {
        ++i_;
        n->op = Op::kCall;
        n->name = t.s;
        static const char* kFns[] = {"min", "max", "divide", "ceil_div", "pad"};
        bool known = false;
        for (const char* f : kFns) known = known || t.s == f;
        if (!known) {
          i_ = start;
          return Error("unknown function '" + t.s + "'");
        }
        if (!IsOp(")")) {
          while (true) {
            WS_ASSIGN_OR_RETURN(NodeP a, ParseExpr(0));
            n->kids.push_back(a);
            if (IsOp(",")) { ++i_; continue; }
            break;
          }
        }
        WS_RETURN_IF_ERROR(Expect(")"));
        bool variadic = t.s == "min" || t.s == "max";
        if (variadic ? n->kids.size() < 2 : n->kids.size() != 2) {
          i_ = start;
          return Error(t.s + "() takes " + (variadic ? "at least 2" : "2") + " arguments");
        }
      } else {
        n->op = Op::kIdent;
        n->name = t.s;
      }
    } else if (t.kind == Token::kOp && (t.s == "-" || t.s == "!")) {
      ++i_;
      WS_ASSIGN_OR_RETURN(NodeP a, ParseExpr(8));  // binds tighter than any binary op
      n->op = t.s == "-" ? Op::kNeg : Op::kNot;
      n->kids = {a};
    } else if (t.kind == Token::kOp && t.s == "(") {
      ++i_;
      WS_ASSIGN_OR_RETURN(NodeP a, ParseExpr(0));
      WS_RETURN_IF_ERROR(Expect(")"));
      // Keep the parenthesised node but remember the outer text.
      auto copy = std::make_shared<Node>(*a);
      copy->text = Span(start, i_);
      return NodeP(copy);
    } else {
      return Error(t.kind == Token::kEnd ? "unexpected end" : "unexpected '" + t.s + "'");
    }
    n->text = Span(start, i_);
    WS_RETURN_IF_ERROR(SetHeight(*n));
    return NodeP(n);
  }

  const std::string& text_;
  std::vector<Token> toks_;
  size_t i_ = 0;
  int depth_ = 0;  // ParseExpr calls in progress
};

// Floor division and modulo. Callers have ruled out b == 0 and
// (INT64_MIN, -1), the only quotient that overflows; neither can overflow then.
int64_t FloorDiv(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}
int64_t FloorMod(int64_t a, int64_t b) {
  int64_t m = a % b;
  if (m != 0 && ((m < 0) != (b < 0))) m += b;
  return m;
}
int64_t CeilDiv(int64_t a, int64_t b) { return FloorDiv(a, b) + (FloorMod(a, b) != 0); }

Status Overflow(const Node& n) { return InvalidArgument("integer overflow in \"" + n.text + "\""); }

Result<int64_t> EvalNode(const Node& n, const Lookup& lookup) {
  switch (n.op) {
    case Op::kNum: return n.num;
    case Op::kIdent: return lookup(n.name);
    case Op::kNeg: {
      WS_ASSIGN_OR_RETURN(int64_t a, EvalNode(*n.kids[0], lookup));
      if (a == std::numeric_limits<int64_t>::min()) return Overflow(n);
      return -a;
    }
    case Op::kNot: {
      WS_ASSIGN_OR_RETURN(int64_t a, EvalNode(*n.kids[0], lookup));
      return int64_t{a == 0};
    }
    case Op::kCoalesce: {
      auto a = EvalNode(*n.kids[0], lookup);
      if (a.ok()) return a;
      if (a.status().code() != Code::kNotFound) return a;
      return EvalNode(*n.kids[1], lookup);
    }
    case Op::kAnd: {
      WS_ASSIGN_OR_RETURN(int64_t a, EvalNode(*n.kids[0], lookup));
      if (!a) return int64_t{0};
      WS_ASSIGN_OR_RETURN(int64_t b, EvalNode(*n.kids[1], lookup));
      return int64_t{b != 0};
    }
    case Op::kOr: {
      WS_ASSIGN_OR_RETURN(int64_t a, EvalNode(*n.kids[0], lookup));
      if (a) return int64_t{1};
      WS_ASSIGN_OR_RETURN(int64_t b, EvalNode(*n.kids[1], lookup));
      return int64_t{b != 0};
    }
    case Op::kTernary: {
      WS_ASSIGN_OR_RETURN(int64_t c, EvalNode(*n.kids[0], lookup));
      return EvalNode(*n.kids[c ? 1 : 2], lookup);
    }
    case Op::kCall: {
      std::vector<int64_t> v;
      for (const auto& k : n.kids) {
        WS_ASSIGN_OR_RETURN(int64_t x, EvalNode(*k, lookup));
        v.push_back(x);
      }
      if (n.name == "min" || n.name == "max") {
        int64_t r = v[0];
        for (int64_t x : v) r = n.name == "min" ? std::min(r, x) : std::max(r, x);
        return r;
      }
      int64_t a = v[0], b = v[1];
      const std::string& ta = n.kids[0]->text;
      const std::string& tb = n.kids[1]->text;
      if (b == 0) return InvalidArgument("division by zero: " + tb + " is 0 in \"" + n.text + "\"");
      if (a == std::numeric_limits<int64_t>::min() && b == -1) return Overflow(n);
      if (n.name == "divide") {
        if (FloorMod(a, b) != 0)
          return InvalidArgument(ta + " (" + std::to_string(a) + ") is not divisible by " + tb + " (" +
                                 std::to_string(b) + ")");
        return a / b;
      }
      if (n.name == "ceil_div") return CeilDiv(a, b);
      // pad(a, m): round a up to a multiple of m.
      int64_t r;
      if (__builtin_mul_overflow(CeilDiv(a, b), b, &r)) return Overflow(n);
      return r;
    }
    default: break;
  }
  WS_ASSIGN_OR_RETURN(int64_t a, EvalNode(*n.kids[0], lookup));
  WS_ASSIGN_OR_RETURN(int64_t b, EvalNode(*n.kids[1], lookup));
  int64_t r = 0;
  switch (n.op) {
    case Op::kAdd: if (__builtin_add_overflow(a, b, &r)) return Overflow(n); return r;
    case Op::kSub: if (__builtin_sub_overflow(a, b, &r)) return Overflow(n); return r;
    case Op::kMul: if (__builtin_mul_overflow(a, b, &r)) return Overflow(n); return r;
    case Op::kDiv:
    case Op::kMod:
      if (b == 0) return InvalidArgument("division by zero: " + n.kids[1]->text + " is 0 in \"" + n.text + "\"");
      if (a == std::numeric_limits<int64_t>::min() && b == -1) return Overflow(n);
      return n.op == Op::kDiv ? FloorDiv(a, b) : FloorMod(a, b);
    case Op::kEq: return int64_t{a == b};
    case Op::kNe: return int64_t{a != b};
    case Op::kLt: return int64_t{a < b};
    case Op::kLe: return int64_t{a <= b};
    case Op::kGt: return int64_t{a > b};
    case Op::kGe: return int64_t{a >= b};
    default: return Internal("bad expression node");
  }
}

}  // namespace

Result<Expr> Expr::Parse(const std::string& text) {
  Parser p(text);
  WS_ASSIGN_OR_RETURN(NodeP root, p.ParseAll());
  Expr e;
  e.root_ = std::move(root);
  e.text_ = text;
  return e;
}

Result<int64_t> Expr::Eval(const Lookup& lookup) const {
  if (!root_) return InvalidArgument("empty expression");
  return EvalNode(*root_, lookup);
}

Result<Template> Template::Parse(const std::string& text) {
  if (text.size() > kMaxExprBytes)
    return InvalidArgument("template \"" + Truncate(text, 64) + "\" is " + std::to_string(text.size()) +
                           " bytes long (at most " + std::to_string(kMaxExprBytes) + ")");
  Template t;
  t.text_ = text;
  std::string lit;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '{') {
      size_t j = text.find('}', i);
      if (j == std::string::npos) return InvalidArgument("unclosed '{' in \"" + text + "\"");
      auto e = Expr::Parse(text.substr(i + 1, j - i - 1));
      if (!e.ok()) return e.status().WithContext("in \"" + text + "\"");
      t.literals_.push_back(std::move(lit));
      lit.clear();
      t.exprs_.push_back(std::move(e).value());
      i = j;
    } else if (text[i] == '}') {
      return InvalidArgument("unmatched '}' in \"" + text + "\"");
    } else {
      lit += text[i];
    }
  }
  t.literals_.push_back(std::move(lit));
  return t;
}

Result<std::string> Template::Render(const Lookup& lookup) const {
  if (literals_.empty()) return text_;
  std::string out = literals_[0];
  for (size_t i = 0; i < exprs_.size(); ++i) {
    WS_ASSIGN_OR_RETURN(int64_t v, exprs_[i].Eval(lookup));
    out += std::to_string(v);
    out += literals_[i + 1];
  }
  return out;
}

}  // namespace ws::expr
