# temperature_zero.kt: a softmax temperature must be positive
# expect: E401
graph temperature_zero
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
label -> a : through
label -> b : through
b     -> a : through kl(T=0)
